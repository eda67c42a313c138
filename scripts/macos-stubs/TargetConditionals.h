/* Stub of Apple's TargetConditionals.h, enough for `scripts/check-macos` to compile ring's C for
 * aarch64-apple-darwin on Linux (a check only: nothing is linked). */
#ifndef RELEASE_TASKS_STUB_TARGET_CONDITIONALS_H
#define RELEASE_TASKS_STUB_TARGET_CONDITIONALS_H
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
#endif
