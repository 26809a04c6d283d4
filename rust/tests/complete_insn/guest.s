# The real-vCPU test guest of tests/complete_insn.rs (64-bit, entered at CPL0 by the
# Linux 64-bit boot protocol). Regenerate the bytes embedded in that test with
#   as guest.s -o guest.o && objcopy -O binary -j .text guest.o guest.bin
# (trailing zeros dropped: the test pads the payload with zeros).
	.code64
	.text
start:
	lea idt(%rip), %rdi
	lea bp_handler(%rip), %rax
	mov $3, %ecx
	call set_gate
	lea db_handler(%rip), %rax
	mov $1, %ecx
	call set_gate
	lea ud_handler(%rip), %rax
	mov $6, %ecx
	call set_gate
	lea idtr(%rip), %rsi
	mov %rdi, 2(%rsi)
	lidt (%rsi)
	# 1. int3: #BP with RIP after it, CS, RSP
	mov %rsp, %rbx
	int3
after_int3:
	lea after_int3(%rip), %rax
	cmp %rax, bp_rip(%rip)
	jne fail1
	cmpq $0x10, bp_cs(%rip)
	jne fail2
	cmp %rbx, bp_rsp(%rip)
	jne fail3
	# 2. int1: #DB with RIP after it
	.byte 0xf1
after_int1:
	lea after_int1(%rip), %rax
	cmp %rax, db_rip(%rip)
	jne fail4
	# 3. ud2: #UD with RIP at it (the handler skips it)
ud2_insn:
	ud2
	lea ud2_insn(%rip), %rax
	cmp %rax, ud_rip(%rip)
	jne fail5
	# 4. lock cmpxchg16b, equal: stores RCX:RBX, ZF=1
	lea buf(%rip), %rdi
	movq $0x1111, (%rdi)
	movq $0x2222, 8(%rdi)
	mov $0x1111, %eax
	mov $0x2222, %edx
	mov $0x3333, %ebx
	mov $0x4444, %ecx
	lock cmpxchg16b (%rdi)
	jne fail6
	cmpq $0x3333, (%rdi)
	jne fail7
	cmpq $0x4444, 8(%rdi)
	jne fail7
	# 5. not equal: loads RDX:RAX, ZF=0, memory unchanged
	mov $9, %eax
	mov $9, %edx
	cmpxchg16b 0(%rdi)
	je fail8
	cmp $0x3333, %rax
	jne fail9
	cmp $0x4444, %rdx
	jne fail9
	cmpq $0x3333, (%rdi)
	jne fail9
	# 6. stac / clac: RFLAGS.AC (bit 18) set, then clear
	stac
	pushfq
	pop %rax
	bt $18, %rax
	jnc fail10
	clac
	pushfq
	pop %rax
	bt $18, %rax
	jc fail10
	# 7. popcnt: 64-bit register, 32-bit zero-extending, memory; ZF for zero
	mov $0x8000000000000003, %rdi
	popcnt %rdi, %rax
	cmp $3, %rax
	jne fail11
	mov $-1, %rcx
	mov $-1, %edi
	popcnt %edi, %ecx
	cmp $32, %rcx
	jne fail11
	lea buf(%rip), %rsi
	movq $0xff, 8(%rsi)
	popcnt 8(%rsi), %rdx
	cmp $8, %rdx
	jne fail11
	xor %edi, %edi
	popcnt %rdi, %rax
	jnz fail11
	# 8. fwait with no x87 exception pending: a no-op (as after fninit)
	fninit
	fwait
	# 9. ldmxcsr (kernel_fpu_begin), read back with stmxcsr
	mov %cr4, %rax
	or $0x200, %rax
	mov %rax, %cr4
	ldmxcsr mxcsr_in(%rip)
	stmxcsr mxcsr_out(%rip)
	cmpl $0x1fc0, mxcsr_out(%rip)
	jne fail12
	# 10. lsl (Linux's GET_PERCPU_BASE reads its CPU number with `lsl` of the
	# CPUNODE selector 0x7b), through a GDT of our own: the boot GDT copied, entry
	# 14 page-granular DPL-0 data (limit 0xf -> 0xffff), entry 15 CPUNODE-like
	# (byte-granular limit 0x1003, DPL 3)
	sgdt gdtr_old(%rip)
	movzwl gdtr_old(%rip), %ecx
	inc %ecx
	mov gdtr_old+2(%rip), %rsi
	lea gdt(%rip), %rdi
	rep movsb
	lea gdtr(%rip), %rsi
	lea gdt(%rip), %rax
	mov %rax, 2(%rsi)
	lgdt (%rsi)
	mov $0x7b, %eax
	lsl %rax, %rax
	jnz fail13
	cmp $0x1003, %rax
	jne fail13
	mov $0x70, %ecx
	mov $-1, %rdx
	lsl %ecx, %edx
	jnz fail14
	cmp $0xffff, %rdx
	jne fail14
	# past the GDT's limit: ZF clear, the destination kept
	mov $0x80, %ecx
	mov $5, %edx
	lsl %ecx, %edx
	jz fail15
	cmp $5, %rdx
	jne fail15
	# a memory source
	lsl sel_cpunode(%rip), %eax
	jnz fail15
	cmp $0x1003, %eax
	jne fail15
	mov $0x55, %al
	jmp done
fail1:	mov $1, %al
	jmp done
fail2:	mov $2, %al
	jmp done
fail3:	mov $3, %al
	jmp done
fail4:	mov $4, %al
	jmp done
fail5:	mov $5, %al
	jmp done
fail6:	mov $6, %al
	jmp done
fail7:	mov $7, %al
	jmp done
fail8:	mov $8, %al
	jmp done
fail9:	mov $9, %al
	jmp done
fail10:	mov $10, %al
	jmp done
fail11:	mov $11, %al
	jmp done
fail12:	mov $12, %al
	jmp done
fail13:	mov $13, %al
	jmp done
fail14:	mov $14, %al
	jmp done
fail15:	mov $15, %al
done:
	out %al, $0xf4
1:	cli
	hlt
	jmp 1b

# rax = handler, ecx = vector, rdi = idt
set_gate:
	shl $4, %ecx
	add %rdi, %rcx
	mov %ax, (%rcx)
	movw $0x10, 2(%rcx)
	movw $0x8e00, 4(%rcx)
	shr $16, %rax
	mov %ax, 6(%rcx)
	shr $16, %rax
	mov %eax, 8(%rcx)
	movl $0, 12(%rcx)
	ret

bp_handler:
	mov (%rsp), %rax
	mov %rax, bp_rip(%rip)
	mov 8(%rsp), %rax
	mov %rax, bp_cs(%rip)
	mov 24(%rsp), %rax
	mov %rax, bp_rsp(%rip)
	iretq
db_handler:
	mov (%rsp), %rax
	mov %rax, db_rip(%rip)
	iretq
ud_handler:
	mov (%rsp), %rax
	mov %rax, ud_rip(%rip)
	addq $2, (%rsp)
	iretq

	.balign 16
buf:	.quad 0, 0
bp_rip:	.quad 0
bp_cs:	.quad 0
bp_rsp:	.quad 0
db_rip:	.quad 0
ud_rip:	.quad 0
mxcsr_in:	.long 0x1fc0
mxcsr_out:	.long 0
sel_cpunode:	.word 0x7b
	.balign 16
gdtr_old:	.word 0
	.quad 0
	.balign 16
gdtr:	.word 16*8-1
	.quad 0
	.balign 8
gdt:	.fill 14*8, 1, 0
	.quad 0x008093000000000f
	.quad 0x0040f50000001003
	.balign 16
idtr:	.word 16*8-1
	.quad 0
	.balign 16
idt:	.fill 16*16, 1, 0
