/* Constants shared by boot.S and the C code. */
#ifndef LAYOUT_H
#define LAYOUT_H

#define SEL_KCODE32   0x08
#define SEL_KDATA     0x10
#define SEL_KCODE     0x18
#define SEL_UDATA     0x23   /* 0x20 | RPL3 */
#define SEL_UCODE     0x2B   /* 0x28 | RPL3 */
#define SEL_TSS       0x30

#define TRAMPOLINE_PA 0x8000
#define KSTACK_SIZE   16384
#define MAX_APICID    1024
#define MAX_CPUS      128

#define VEC_TIMER     0xEC
#define VEC_WAKE      0xED
#define VEC_PING      0xEE
#define VEC_PONG      0xEF
#define VEC_SPURIOUS  0xFF
/* The conform workload's test vectors: counted and logged per CPU, EOIed */
#define VEC_CONFORM_FIRST 0x40
#define VEC_CONFORM_LAST  0x7F

#endif
