//! Unit tests of the exit dispatch and the state machine (no KVM needed).

use super::refused::kvm_insn_bytes;
use super::*;
use crate::apic::{DeliveryMode, InterruptMessage};
use crate::bus::BusDevice;
use kvm_ioctls::{MsrExitReason, ReadMsrExit, WriteMsrExit};

#[derive(Default)]
struct Sink {
    ipis: Mutex<Vec<(u32, InterruptMessage)>>,
    eois: Mutex<Vec<u8>>,
}
impl InterruptSink for Sink {
    fn send_ipi(&self, from: u32, msg: InterruptMessage) {
        self.ipis.lock().unwrap().push((from, msg));
    }
    fn eoi(&self, _from: u32, vector: u8) {
        self.eois.lock().unwrap().push(vector);
    }
}

struct Port {
    writes: Vec<(u64, Vec<u8>)>,
}
impl BusDevice for Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0x40 + offset as u8);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<BusAction> {
        self.writes.push((offset, data.to_vec()));
        None
    }
}

struct Fixture {
    pio: Bus,
    mmio: Bus,
    lapic: Mutex<LocalApic>,
    sink: Sink,
    stats: VcpuStats,
    port: Arc<Mutex<Port>>,
}

impl Fixture {
    fn new() -> Self {
        let port = Arc::new(Mutex::new(Port { writes: vec![] }));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, "port", port.clone()).unwrap();
        pio.insert(
            0xf4,
            1,
            "exit",
            Arc::new(Mutex::new(crate::devices::DebugExit)),
        )
        .unwrap();
        let mut mmio = Bus::new();
        mmio.insert(0xfec0_0000, 0x1000, "mmio", port.clone())
            .unwrap();
        Fixture {
            pio,
            mmio,
            lapic: Mutex::new(LocalApic::new(0, true, 0)),
            sink: Sink::default(),
            stats: VcpuStats::default(),
            port,
        }
    }

    fn handle(&mut self, exit: VcpuExit<'_>) -> VcpuAction {
        let mut ctx = ExitContext {
            vcpu: 0,
            pio: &self.pio,
            mmio: &self.mmio,
            lapic: &self.lapic,
            irq: &self.sink,
            now_ns: 1000,
            stats: &mut self.stats,
            debug: false,
            apic_base_written: None,
            kernel_lapic: false,
        };
        handle_exit(exit, &mut ctx).unwrap()
    }
}

#[test]
fn pio_dispatch_and_unknown_ports() {
    let mut f = Fixture::new();
    let mut d = [0u8; 1];
    assert_eq!(
        f.handle(VcpuExit::IoIn(0x3fd, &mut d)),
        VcpuAction::Continue
    );
    assert_eq!(d, [0x45]);
    assert_eq!(f.handle(VcpuExit::IoOut(0x3f8, b"A")), VcpuAction::Continue);
    assert_eq!(f.port.lock().unwrap().writes, vec![(0, b"A".to_vec())]);
    // Unknown ports: reads all-ones, writes ignored and counted.
    let mut d4 = [0u8; 4];
    assert_eq!(
        f.handle(VcpuExit::IoIn(0x1234, &mut d4)),
        VcpuAction::Continue
    );
    assert_eq!(d4, [0xff; 4]);
    assert_eq!(
        f.handle(VcpuExit::IoOut(0x80, &[1, 2])),
        VcpuAction::Continue
    );
    assert_eq!(f.stats.unknown_pio, 2);
    assert_eq!(f.stats.exits[EK_IO], 4);
    // Debug exit: the raw byte is the status.
    assert_eq!(
        f.handle(VcpuExit::IoOut(0xf4, &[7, 0, 0, 0])),
        VcpuAction::StopVm(7)
    );
}

#[test]
fn mmio_dispatch_lapic_and_unknown() {
    let mut f = Fixture::new();
    let mut d = [0u8; 4];
    // LAPIC version register.
    assert_eq!(
        f.handle(VcpuExit::MmioRead(LAPIC_BASE + 0x30, &mut d)),
        VcpuAction::Continue
    );
    assert_eq!(u32::from_le_bytes(d), crate::apic::APIC_VERSION);
    // LAPIC ID register = APIC ID 0 << 24.
    f.handle(VcpuExit::MmioRead(LAPIC_BASE + 0x20, &mut d));
    assert_eq!(u32::from_le_bytes(d), 0);
    assert_eq!(f.stats.lapic_accesses, 2);
    // The bus.
    f.handle(VcpuExit::MmioRead(0xfec0_0010, &mut d));
    assert_eq!(d, [0x50; 4]);
    f.handle(VcpuExit::MmioWrite(0xfec0_0000, &[1, 0, 0, 0]));
    assert_eq!(f.port.lock().unwrap().writes.len(), 1);
    // Unknown MMIO.
    f.handle(VcpuExit::MmioRead(0xd000_0000, &mut d));
    assert_eq!(d, [0xff; 4]);
    f.handle(VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]));
    assert_eq!(f.stats.unknown_mmio, 2);
    // Garbage to the LAPIC never panics.
    f.handle(VcpuExit::MmioWrite(LAPIC_BASE + 0x3, &[0xff]));
    f.handle(VcpuExit::MmioWrite(
        LAPIC_BASE + 0xff0,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    ));
    let mut d1 = [0u8; 1];
    f.handle(VcpuExit::MmioRead(LAPIC_BASE + 0xfff, &mut d1));
}

#[test]
fn icr_write_sends_an_ipi() {
    let mut f = Fixture::new();
    // Software-enable the APIC (SVR bit 8).
    f.handle(VcpuExit::MmioWrite(
        LAPIC_BASE + 0xf0,
        &0x1ffu32.to_le_bytes(),
    ));
    // ICR high: destination APIC 1; ICR low: fixed, vector 0x40.
    f.handle(VcpuExit::MmioWrite(
        LAPIC_BASE + 0x310,
        &(1u32 << 24).to_le_bytes(),
    ));
    f.handle(VcpuExit::MmioWrite(
        LAPIC_BASE + 0x300,
        &0x40u32.to_le_bytes(),
    ));
    let ipis = f.sink.ipis.lock().unwrap();
    assert_eq!(ipis.len(), 1);
    assert_eq!(ipis[0].0, 0);
    assert_eq!(ipis[0].1.vector, 0x40);
    assert_eq!(ipis[0].1.delivery_mode, DeliveryMode::Fixed);
    assert_eq!(ipis[0].1.destination.id, 1);
    assert_eq!(f.stats.ipis_sent, 1);
}

#[test]
fn msr_exits_answer_from_lapic_or_gp() {
    let mut f = Fixture::new();
    let (mut err, mut data) = (0u8, 0u64);
    let a = f.handle(VcpuExit::X86Rdmsr(ReadMsrExit {
        error: &mut err,
        reason: MsrExitReason::Filter,
        index: 0x1b,
        data: &mut data,
    }));
    assert_eq!(a, VcpuAction::Continue);
    assert_eq!(err, 0);
    assert_eq!(data & 0xffff_f000, 0xfee0_0000);
    assert_ne!(data & (1 << 8), 0, "BSP bit");
    // x2APIC MSR while in xAPIC mode: #GP.
    let a = f.handle(VcpuExit::X86Rdmsr(ReadMsrExit {
        error: &mut err,
        reason: MsrExitReason::Inval,
        index: 0x802,
        data: &mut data,
    }));
    assert_eq!(a, VcpuAction::Continue);
    assert_eq!(err, 1);
    // Switch to x2APIC mode, then the ID MSR works.
    let mut werr = 0u8;
    f.handle(VcpuExit::X86Wrmsr(WriteMsrExit {
        error: &mut werr,
        reason: MsrExitReason::Filter,
        index: 0x1b,
        data: 0xfee0_0000 | (1 << 11) | (1 << 10) | (1 << 8),
    }));
    assert_eq!(werr, 0);
    let mut err2 = 0u8;
    f.handle(VcpuExit::X86Rdmsr(ReadMsrExit {
        error: &mut err2,
        reason: MsrExitReason::Inval,
        index: 0x802,
        data: &mut data,
    }));
    assert_eq!(err2, 0);
    assert_eq!(data, 0);
    // An unknown MSR: #GP.
    let mut err3 = 0u8;
    f.handle(VcpuExit::X86Wrmsr(WriteMsrExit {
        error: &mut err3,
        reason: MsrExitReason::Unknown,
        index: 0xdead,
        data: 1,
    }));
    assert_eq!(err3, 1);
    assert_eq!(f.stats.msr_gp, 2);
    // x2APIC ICR write: one MSR, one IPI.
    let mut e = 0u8;
    f.handle(VcpuExit::X86Wrmsr(WriteMsrExit {
        error: &mut e,
        reason: MsrExitReason::Inval,
        index: 0x80f,
        data: 0x1ff,
    }));
    f.handle(VcpuExit::X86Wrmsr(WriteMsrExit {
        error: &mut e,
        reason: MsrExitReason::Inval,
        index: 0x830,
        data: (3u64 << 32) | 0x4500, // INIT to APIC 3
    }));
    assert_eq!(e, 0);
    let ipis = f.sink.ipis.lock().unwrap();
    assert_eq!(ipis.len(), 1);
    assert_eq!(ipis[0].1.delivery_mode, DeliveryMode::Init);
    assert_eq!(ipis[0].1.destination.id, 3);
}

#[test]
fn crash_and_control_exits() {
    let mut f = Fixture::new();
    assert_eq!(f.handle(VcpuExit::Hlt), VcpuAction::Halt);
    assert_eq!(f.handle(VcpuExit::IrqWindowOpen), VcpuAction::Continue);
    assert_eq!(f.handle(VcpuExit::Intr), VcpuAction::Continue);
    assert_eq!(
        f.handle(VcpuExit::Shutdown),
        VcpuAction::Crash(CrashKind::TripleFault)
    );
    assert_eq!(
        f.handle(VcpuExit::InternalError),
        VcpuAction::Crash(CrashKind::InternalError)
    );
    assert_eq!(
        f.handle(VcpuExit::FailEntry(0x21, 1)),
        VcpuAction::Crash(CrashKind::FailEntry {
            reason: 0x21,
            cpu: 1
        })
    );
    assert!(matches!(
        f.handle(VcpuExit::Unknown),
        VcpuAction::Crash(CrashKind::Unexpected(_))
    ));
    assert!(matches!(
        f.handle(VcpuExit::SystemEvent(
            kvm_bindings::KVM_SYSTEM_EVENT_RESET,
            &[]
        )),
        VcpuAction::Shutdown(_)
    ));
    assert_eq!(f.stats.exits[EK_HLT], 1);
    assert_eq!(f.stats.exits[EK_SHUTDOWN], 1);
}

#[test]
fn state_machine_transitions() {
    use VcpuState::*;
    assert_eq!(
        next_state(Created, VcpuEvent::Start { is_bsp: true }),
        Running
    );
    assert_eq!(
        next_state(Created, VcpuEvent::Start { is_bsp: false }),
        WaitForSipi
    );
    assert_eq!(next_state(Created, VcpuEvent::Hlt), Created);
    assert_eq!(next_state(Running, VcpuEvent::Hlt), Halted);
    assert_eq!(next_state(Halted, VcpuEvent::Wake), Running);
    assert_eq!(next_state(Halted, VcpuEvent::Init), WaitForSipi);
    assert_eq!(next_state(Running, VcpuEvent::Init), WaitForSipi);
    assert_eq!(next_state(WaitForSipi, VcpuEvent::Sipi), Running);
    assert_eq!(next_state(WaitForSipi, VcpuEvent::Wake), WaitForSipi);
    assert_eq!(next_state(Running, VcpuEvent::Sipi), Running);
    assert_eq!(next_state(Running, VcpuEvent::Pause), Paused);
    assert_eq!(next_state(Paused, VcpuEvent::Hlt), Paused);
    assert_eq!(next_state(Paused, VcpuEvent::Resume(Halted)), Halted);
    // Restored from a snapshot (Created) or migrated back in (Paused where it
    // had left): the saved state.
    assert_eq!(next_state(Created, VcpuEvent::Restore(Halted)), Halted);
    assert_eq!(next_state(Paused, VcpuEvent::Restore(Running)), Running);
    assert_eq!(
        next_state(Paused, VcpuEvent::Restore(WaitForSipi)),
        WaitForSipi
    );
    assert_eq!(next_state(Paused, VcpuEvent::Restore(Stopped)), Paused);
    assert_eq!(next_state(Running, VcpuEvent::Restore(Halted)), Running);
    for s in [Created, Running, Halted, WaitForSipi, Paused] {
        assert_eq!(next_state(s, VcpuEvent::Stop), Stopped);
    }
    assert_eq!(next_state(Stopped, VcpuEvent::Resume(Running)), Stopped);
    assert_eq!(
        next_state(Stopped, VcpuEvent::Start { is_bsp: true }),
        Stopped
    );
}

#[test]
fn a_replica_takes_posted_messages_only_where_it_runs() {
    // Residency starts on and changes under the LAPIC lock; a vCPU that does
    // not run here gets deliveries posted, not accepted into its LAPIC.
    let s = VcpuShared::new(1, LocalApic::new(1, false, 0));
    assert!(s.is_resident());
    s.set_resident(false, &lock(&s.lapic));
    assert!(!s.is_resident());
    s.set_resident(true, &lock(&s.lapic));
    assert!(s.is_resident());
}

#[test]
fn shared_requests_and_kicks() {
    let s = VcpuShared::new(1, LocalApic::new(1, false, 0));
    assert_eq!(s.state(), VcpuState::Created);
    assert_eq!(s.request(), Request::None);
    s.start();
    assert_eq!(s.request(), Request::Run);
    s.pause();
    assert_eq!(s.request(), Request::Pause);
    s.stop();
    s.resume(); // Stop is final.
    assert_eq!(s.request(), Request::Stop);
    // A kick before the wait is not lost.
    s.kick();
    let t = std::time::Instant::now();
    s.wait_kick(Some(Duration::from_secs(5)));
    assert!(t.elapsed() < Duration::from_secs(1));
    // A wait with no kick times out.
    let t = std::time::Instant::now();
    s.wait_kick(Some(Duration::from_millis(20)));
    assert!(t.elapsed() >= Duration::from_millis(15));
}

#[test]
fn kick_from_another_thread_wakes_a_sleeper() {
    let s = Arc::new(VcpuShared::new(0, LocalApic::new(0, true, 0)));
    let s2 = s.clone();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        s2.kick();
    });
    let t = std::time::Instant::now();
    s.wait_kick(None);
    assert!(t.elapsed() < Duration::from_secs(5));
    h.join().unwrap();
}

#[test]
fn vm_stop_first_reason_wins() {
    let st = VmStop::new();
    assert_eq!(st.wait(Some(Duration::from_millis(5))), None);
    st.request(StopReason::DebugExit(1));
    st.request(StopReason::Timeout);
    assert_eq!(st.wait(None), Some(StopReason::DebugExit(1)));
}

#[test]
fn dump_formats_registers() {
    let r = kvm_regs {
        rip: 0x1000,
        rax: 5,
        ..Default::default()
    };
    let s = kvm_sregs::default();
    let d = VcpuDump::from_regs(2, "triple fault", &r, &s);
    assert_eq!(d.rip, "0x1000");
    assert_eq!(d.regs["rax"], "0x5");
    assert!(d.summary().contains("vCPU 2"));
    let j = serde_json::to_value(&d).unwrap();
    assert_eq!(j["exit_reason"], "triple fault");
}

// ---------------------------------------------------------------------------------
// Halted wait / kick (regression: a kick must never be lost nor block the kicker)
// ---------------------------------------------------------------------------------

fn shared() -> Arc<VcpuShared> {
    Arc::new(VcpuShared::new(1, LocalApic::new(1, false, 0)))
}

#[test]
fn kick_before_wait_is_not_lost() {
    let s = shared();
    s.kick();
    let t = std::time::Instant::now();
    s.wait_kick(Some(Duration::from_secs(10)));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "kick before the wait was lost"
    );
    // Consumed: the next wait times out.
    let t = std::time::Instant::now();
    s.wait_kick(Some(Duration::from_millis(20)));
    assert!(t.elapsed() >= Duration::from_millis(15));
}

#[test]
fn kick_between_check_and_sleep_is_not_lost() {
    // The window the old condvar design had to close with a lock: the waiter has
    // announced itself and looked at the flag, then the kick comes, then it sleeps.
    // The futex re-checks the word, so the sleep returns at once.
    let s = shared();
    s.sleeping.store(true, Ordering::SeqCst);
    assert_eq!(s.kick_flag.swap(0, Ordering::SeqCst), 0);
    s.kick(); // sees `sleeping` and wakes (nobody is in the futex yet)
    let t = std::time::Instant::now();
    futex_wait(&s.kick_flag, 0, Some(Duration::from_secs(10)));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "kick in the window was lost"
    );
}

#[test]
fn kick_wakes_a_sleeping_vcpu() {
    let s = shared();
    let s2 = s.clone();
    let h = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        s2.wait_kick(Some(Duration::from_secs(10)));
        t.elapsed()
    });
    while !s.sleeping.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    s.kick();
    assert!(h.join().unwrap() < Duration::from_secs(5));
}

#[test]
fn set_tpr_exit_continues() {
    // KVM_EXIT_SET_TPR (VT-x/AMD-V, CR8 lowered, userspace LAPIC) is not a crash.
    let mut f = Fixture::new();
    assert_eq!(f.handle(VcpuExit::SetTpr), VcpuAction::Continue);
    assert_eq!(f.stats.exits[EK_OTHER], 1);
}

#[test]
fn emulation_failure_instruction_bytes() {
    // KVM_INTERNAL_ERROR_EMULATION with the instruction-bytes flag: data[0] = flags,
    // then insn_size and the bytes (here `lock cmpxchg16b (%rdi)`, 5 bytes).
    let mut i = kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13 {
        suberror: kvm_bindings::KVM_INTERNAL_ERROR_EMULATION,
        ndata: 3,
        data: [0; 16],
    };
    let mut raw = [0u8; 16];
    raw[0] = 5;
    raw[1..6].copy_from_slice(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
    i.data[0] = 1;
    i.data[1] = u64::from_le_bytes(raw[..8].try_into().unwrap());
    i.data[2] = u64::from_le_bytes(raw[8..].try_into().unwrap());
    let (b, n) = kvm_insn_bytes(&i);
    assert_eq!(&b[..n], &[0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
    assert!(matches!(
        complete::decode(&b[..n]).map(|d| d.insn),
        Ok(complete::Insn::Cmpxchg16b { lock: true, .. })
    ));
    // Without the flag (older KVM) or with too little data: no bytes, so the
    // completion reads the instruction from guest memory.
    i.data[0] = 0;
    assert_eq!(kvm_insn_bytes(&i).1, 0);
    i.data[0] = 1;
    i.ndata = 2;
    assert_eq!(kvm_insn_bytes(&i).1, 0);
    // An insn_size beyond 15 is clamped.
    i.ndata = 3;
    i.data[1] |= 0xff;
    assert_eq!(kvm_insn_bytes(&i).1, 15);
}
