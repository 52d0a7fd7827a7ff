/* startup.c: the smallest start-up code for a Cortex-M under QEMU: the vector table, .data and .bss set-up,
   and output and exit through ARM semihosting (no C library needed). */
#include <stddef.h>
#include <stdint.h>

#include "startup.h"

/* Defined by the linker script (sections.ld, included by the board's microbit.ld or mps2.ld). */
extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
int main(void);

/* ARM semihosting: r0 = operation, r1 = argument, then BKPT 0xAB in Thumb state; the debugger (here QEMU with
   -semihosting-config enable=on) performs the operation and puts the result in r0. */
static int semihost(int operation, const void *argument) {
  register int r0 __asm__("r0") = operation;
  register const void *r1 __asm__("r1") = argument;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

void semihost_write0(const char *text) { semihost(0x04, text); } /* SYS_WRITE0: a NUL-terminated string */

void semihost_exit(int code) {
  /* SYS_EXIT with a reason: ADP_Stopped_ApplicationExit (0x20026) makes QEMU exit with status 0, any other
     reason (0x20023, ADP_Stopped_RunTimeErrorUnknown) with status 1. */
  semihost(0x18, (const void *)(uintptr_t)(code == 0 ? 0x20026u : 0x20023u));
  for (;;) {
  }
}

/* The compiler may call these for copies and fills even in freestanding code. */
void *memcpy(void *dst, const void *src, size_t n) {
  uint8_t *d = dst;
  const uint8_t *s = src;
  while (n--) *d++ = *s++;
  return dst;
}

void *memset(void *dst, int value, size_t n) {
  uint8_t *d = dst;
  while (n--) *d++ = (uint8_t)value;
  return dst;
}

/* The free RAM between .bss and the stack pointer is painted with this word at reset; the stack overwrites it
   as it grows, so the lowest overwritten word marks the deepest the stack has been. */
#define STACK_PAINT 0x5AC3A55Au

uint32_t stack_bytes_used(void) {
  const uint32_t *p = &_ebss;
  while (p < &_estack && *p == STACK_PAINT) ++p;
  return (uint32_t)((uintptr_t)&_estack - (uintptr_t)p);
}

/* After reset: copy .data from flash to RAM, zero .bss, paint the free RAM below the stack, run main, exit with
   its status. */
void Reset_Handler(void) {
  const uint32_t *src = &_sidata;
  uint32_t *dst;
  uintptr_t sp;
  for (dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  for (dst = &_ebss; (uintptr_t)dst + 64 < sp;) *dst++ = STACK_PAINT; /* 64 bytes below sp: this function's frame */
  semihost_exit(main());
}

/* Any fault or unexpected interrupt: say so and stop with a failure. */
void Default_Handler(void) {
  semihost_write0("fault: unexpected exception\n");
  semihost_exit(1);
}

/* The vector table, at address 0: the initial stack pointer, then the handlers (16 system entries; on a Cortex-M0
   the memory management, bus and usage fault and debug monitor entries are reserved and never taken). */
__attribute__((section(".isr_vector"), used)) static const uintptr_t vector_table[16] = {
    (uintptr_t)&_estack,        /* initial stack pointer */
    (uintptr_t)Reset_Handler,   /* reset */
    (uintptr_t)Default_Handler, /* NMI */
    (uintptr_t)Default_Handler, /* hard fault */
    (uintptr_t)Default_Handler, /* memory management fault */
    (uintptr_t)Default_Handler, /* bus fault */
    (uintptr_t)Default_Handler, /* usage fault */
    0, 0, 0, 0,                 /* reserved */
    (uintptr_t)Default_Handler, /* SVCall */
    (uintptr_t)Default_Handler, /* debug monitor */
    0,                          /* reserved */
    (uintptr_t)Default_Handler, /* PendSV */
    (uintptr_t)Default_Handler, /* SysTick */
};
