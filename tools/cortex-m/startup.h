/* startup.h: what startup.c gives the firmware: output and exit through ARM semihosting, and the stack's depth. */
#ifndef LOWBIT_STARTUP_H
#define LOWBIT_STARTUP_H

#include <stdint.h>

void semihost_write0(const char *text); /* prints a NUL-terminated string on the host's stdout */
void semihost_exit(int code);           /* ends the emulation: status 0 if code is 0, else 1 */
uint32_t stack_bytes_used(void);        /* the deepest the stack has been since reset, in bytes */

#endif
