/* Stub of assert.h for `scripts/check-macos` (no Apple SDK on Linux; nothing is linked). */
#ifndef RELEASE_TASKS_STUB_ASSERT_H
#define RELEASE_TASKS_STUB_ASSERT_H
#define assert(x) ((void)0)
#endif
