/* Stub of string.h for `scripts/check-macos`: the four functions ring's C uses (no Apple SDK on
 * Linux; nothing is linked). */
#ifndef RELEASE_TASKS_STUB_STRING_H
#define RELEASE_TASKS_STUB_STRING_H
#include <stddef.h>
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
#endif
