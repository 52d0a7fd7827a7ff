/* semihosting.h: output and exit through ARM semihosting (startup.c). */
#ifndef LOWBIT_SEMIHOSTING_H
#define LOWBIT_SEMIHOSTING_H

void semihost_write0(const char *text); /* prints a NUL-terminated string on the host's stdout */
void semihost_exit(int code);           /* ends the emulation: status 0 if code is 0, else 1 */

#endif
