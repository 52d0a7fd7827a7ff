/* startup.c: the smallest start-up code for a Cortex-M under QEMU: the vector table, .data and .bss set-up,
   and output and exit through ARM semihosting (no C library needed). */
#include <stddef.h>
#include <stdint.h>

#include "semihosting.h"

/* Defined by the linker script (mps2-an385.ld). */
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

/* After reset: copy .data from flash to RAM, zero .bss, run main, exit with its status. */
void Reset_Handler(void) {
  const uint32_t *src = &_sidata;
  uint32_t *dst;
  for (dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  semihost_exit(main());
}

/* Any fault or unexpected interrupt: say so and stop with a failure. */
void Default_Handler(void) {
  semihost_write0("fault: unexpected exception\n");
  semihost_exit(1);
}

/* The vector table, at address 0: the initial stack pointer, then the handlers (Cortex-M3: 16 system entries). */
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
