/*
 * dvmm-guest: boot code.
 *
 *  - Xen PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY): the loader enters pvh_entry
 *    in 32-bit protected mode, paging off, EBX = physical address of
 *    struct hvm_start_info.
 *  - static identity page tables for 0..4 GiB (2 MiB pages,
 *    0xFE000000..0xFFFFFFFF uncached), every page user-accessible (the
 *    workloads at CPL3 share the identity map with the kernel).
 *  - AP trampoline (real mode, copied to TRAMPOLINE_PA by the BSP).
 *  - 256 interrupt stubs + common entry, and enter_user (iretq to CPL3).
 *
 * Everything here runs at CPL0 and is therefore emulated on PVM hosts: keep it
 * short and use only plain instructions.
 */
#include "layout.h"

/* ------------------------------------------------------------------ */
/* PVH note: desc is a .quad, as Linux does; QEMU reads a size_t for   */
/* ELF64 files, other loaders read the low 32 bits.                    */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz */
        .long 8                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .quad pvh_entry

/* ------------------------------------------------------------------ */
        .section .text.entry, "ax"
        .code32
        .globl pvh_entry
pvh_entry:
        cli
        cld
        movl %ebx, boot_start_info
        lgdt boot_gdtr
        ljmp $SEL_KCODE32, $1f
1:      movl $SEL_KDATA, %eax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorl %ebp, %ebp                 /* BSP */
        jmp entry32_common

        /* APs arrive here from the trampoline, CS = SEL_KCODE32 */
        .globl ap_entry32
ap_entry32:
        movl $SEL_KDATA, %eax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $1, %ebp                   /* AP */

entry32_common:
        movl %cr4, %eax
        /* PAE; OSFXSR | OSXMMEXCPT: SSE for the NPB kernels, which alone run
         * SSE code, at CPL3 (the kernel is general-registers only, so it never
         * touches the XMM state user code owns; CR0 keeps EM clear, MP set) */
        orl $0x620, %eax
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER.LME */
        rdmsr
        orl $0x100, %eax
        wrmsr
        movl %cr0, %eax
        andl $0x9FFFFFFF, %eax          /* caches on (CD=NW=0) */
        orl $0x80010023, %eax           /* PG | WP | NE | MP | PE */
        movl %eax, %cr0
        ljmp $SEL_KCODE, $entry64

        .code64
entry64:
        movl $SEL_KDATA, %eax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        xorl %eax, %eax
        movw %ax, %fs
        movw %ax, %gs
        testl %ebp, %ebp
        jnz ap64
        /* BSP: zero .bss (rep stos is one emulated instruction), stack, C */
        leaq __bss_start(%rip), %rdi
        leaq __bss_end(%rip), %rcx
        subq %rdi, %rcx
        shrq $3, %rcx
        xorl %eax, %eax
        rep stosq
        leaq bsp_kstack+KSTACK_SIZE(%rip), %rsp
        movl boot_start_info(%rip), %edi
        call kmain
        jmp halt_forever

ap64:
        /* Find our APIC ID, then our stack in ap_stack_by_apic[]. */
        cmpl $0, use_x2apic(%rip)
        je 2f
        movl $0x1B, %ecx                /* IA32_APIC_BASE: EN | EXTD */
        rdmsr
        orl $0xC00, %eax
        wrmsr
        movl $0x802, %ecx
        rdmsr
        jmp 3f
2:      movl 0xFEE00020, %eax
        shrl $24, %eax
3:      cmpl $MAX_APICID, %eax
        jae halt_forever
        movl %eax, %edi
        leaq ap_stack_by_apic(%rip), %rdx
        movq (%rdx,%rax,8), %rsp
        testq %rsp, %rsp
        jz halt_forever
        call ap_main
        .globl halt_forever
halt_forever:
        cli
        hlt
        jmp halt_forever

/* ------------------------------------------------------------------ */
/* AP trampoline, copied to TRAMPOLINE_PA (SIPI vector TRAMPOLINE_PA>>12) */
        .code16
        .globl trampoline_start, trampoline_end
trampoline_start:
        cli
        cld
        xorw %ax, %ax
        movw %ax, %ds
        lgdtl (tramp_gdtr - trampoline_start + TRAMPOLINE_PA)
        movl %cr0, %eax
        orl $1, %eax
        movl %eax, %cr0
        ljmpl $SEL_KCODE32, $ap_entry32
        .balign 8
tramp_gdtr:
        .word boot_gdt_end - boot_gdt - 1
        .long boot_gdt
trampoline_end:

/* ------------------------------------------------------------------ */
/* Interrupt stubs: 16 bytes each; vectors with a CPU error code skip   */
/* the dummy push.                                                      */
        .code64
        .balign 16
        .globl isr_stubs
isr_stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
        .else
        pushq $0
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr

/* Frame (see struct trap_frame): caller-saved registers only, the C     */
/* handler preserves the others.                                        */
isr_common:
        pushq %rax
        pushq %rcx
        pushq %rdx
        pushq %rsi
        pushq %rdi
        pushq %r8
        pushq %r9
        pushq %r10
        pushq %r11
        movq %rsp, %rdi
        call trap
        popq %r11
        popq %r10
        popq %r9
        popq %r8
        popq %rdi
        popq %rsi
        popq %rdx
        popq %rcx
        popq %rax
        addq $16, %rsp
        iretq

/* void enter_user(u64 rip, u64 rsp, u64 arg) -- never returns */
        .globl enter_user
enter_user:
        pushq $SEL_UDATA
        pushq %rsi
        pushq $0x202                    /* IF=1, IOPL=0 */
        pushq $SEL_UCODE
        pushq %rdi
        movq %rdx, %rdi
        xorl %eax, %eax
        movw %ax, %ds
        movw %ax, %es
        iretq

/* void cpu_idle_wait(void): sti; hlt; cli -- woken by any interrupt */
        .globl cpu_idle_wait
cpu_idle_wait:
        sti
        hlt
        cli
        ret

/* ------------------------------------------------------------------ */
        .section .data
        .balign 16
        .globl boot_start_info
boot_start_info:
        .long 0
        .long 0
        .balign 16
boot_gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF        /* 0x08 kernel code 32 */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00AF9A000000FFFF        /* 0x18 kernel code 64 */
boot_gdt_end:
        .balign 8
        .word 0, 0, 0
boot_gdtr:
        .word boot_gdt_end - boot_gdt - 1
        .long boot_gdt

/* Identity page tables, 0..4 GiB. Entries carry U/S so CPL3 can use them. */
        .balign 4096
        .globl pml4, pdpt, pd_low
pml4:
        .quad pdpt + 0x07
        .fill 511, 8, 0
pdpt:
        .quad pd_low + 0x07
        .quad pd_low + 0x1000 + 0x07
        .quad pd_low + 0x2000 + 0x07
        .quad pd_low + 0x3000 + 0x07
        .fill 508, 8, 0
pd_low:
        .set i, 0
        .rept 2048
        .if i >= 2032
        .quad (i << 21) | 0x9F          /* P RW US PWT PCD PS: APIC/IOAPIC */
        .else
        .quad (i << 21) | 0x87          /* P RW US PS */
        .endif
        .set i, i + 1
        .endr

        .section .note.GNU-stack, "", @progbits
