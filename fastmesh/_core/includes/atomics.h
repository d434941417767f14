/* Per-slot locks for tables in memory shared between processes (fastmesh/_core/ratelimit.pyx).
 *
 * The lock word holds the pid of its holder (0 = free), so a process that died while holding a
 * lock (SIGKILL in the middle of a few instructions) cannot wedge the others forever: after a
 * long spin the waiter checks whether the holder still exists and takes the lock over if not.
 * Critical sections are a handful of loads and stores, so contention spins are short.
 */
#ifndef FASTMESH_ATOMICS_H
#define FASTMESH_ATOMICS_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

#define FM_SPINS_BEFORE_YIELD 128
#define FM_YIELDS_BEFORE_CHECK 4096

static inline void fm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline uint64_t fm_load_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void fm_store_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

static inline uint32_t fm_load_u32(const uint32_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline int fm_trylock(uint32_t *lock, uint32_t me) {
    uint32_t expected = 0;
    return __atomic_compare_exchange_n(lock, &expected, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

/* Spin, then yield; every FM_YIELDS_BEFORE_CHECK yields, take the lock over from a dead holder. */
static inline void fm_lock(uint32_t *lock, uint32_t me) {
    unsigned spins = 0, yields = 0;
    for (;;) {
        if (__atomic_load_n(lock, __ATOMIC_RELAXED) == 0 && fm_trylock(lock, me))
            return;
        if (++spins < FM_SPINS_BEFORE_YIELD) {
            fm_cpu_relax();
            continue;
        }
        spins = 0;
        sched_yield();
        if (++yields < FM_YIELDS_BEFORE_CHECK)
            continue;
        yields = 0;
        uint32_t holder = __atomic_load_n(lock, __ATOMIC_RELAXED);
        if (holder != 0 && holder != me && kill((pid_t)holder, 0) != 0 && errno == ESRCH) {
            /* The holder is gone: its half-done update is at worst a count off by its cost. */
            if (__atomic_compare_exchange_n(lock, &holder, me, 0, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED))
                return;
        }
    }
}

static inline void fm_count_add(uint64_t *p) {
    __atomic_add_fetch(p, 1, __ATOMIC_RELAXED);
}

static inline int fm_errno(void) {
    return errno;
}

static inline void fm_unlock(uint32_t *lock) {
    __atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}

#endif
