/* /init of the Linux boot test's initramfs (tests/linux/linux_boot.py): prints one
 * line on the console (fd 1, which the kernel opens on /dev/console for init), then
 * sleeps forever. No libc: built with gcc -static -nostdlib -ffreestanding. */
#define SYS_write 1
#define SYS_pause 34

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

void _start(void)
{
	static const char msg[] = "dvmm-linux-init: /init is running in user space\n";
	sys3(SYS_write, 1, (long)msg, sizeof msg - 1);
	for (;;)
		sys3(SYS_pause, 0, 0, 0);
}
