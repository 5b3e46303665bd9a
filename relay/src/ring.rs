//! A bounded single-producer, single-consumer ring for messages between threads (the control
//! thread to a shard now; shard to shard for chat later). Never blocks, never allocates after
//! creation: `push` fails when full and the producer decides what that means.
//!
//! The producer and consumer positions live on separate cache lines so that the two threads do
//! not write to the same line.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[repr(align(128))]
struct Padded(AtomicUsize);

struct Shared<T> {
    /// Next slot the producer writes; only the producer stores it.
    head: Padded,
    /// Next slot the consumer reads; only the consumer stores it.
    tail: Padded,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

// SAFETY: a slot is accessed by exactly one side at a time: the producer writes slots in
// [tail + len, ...) before publishing them with a release store of `head`; the consumer reads
// slots in [tail, head) after an acquire load of `head`, and hands them back with a release
// store of `tail`. `T: Send` because values move between threads.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above; the ring owns its values.
unsafe impl<T: Send> Send for Shared<T> {}

/// The sending half.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving half.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
}

/// A ring with room for `capacity` messages (at least 1).
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity.max(1);
    let shared = Arc::new(Shared {
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
        slots: (0..capacity)
            .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
            .collect(),
    });
    (
        Producer {
            shared: shared.clone(),
        },
        Consumer { shared },
    )
}

impl<T: Send> Producer<T> {
    /// Appends `value`, or gives it back when the ring is full.
    pub fn push(&mut self, value: T) -> Result<(), T> {
        let s = &*self.shared;
        let head = s.head.0.load(Ordering::Relaxed);
        let tail = s.tail.0.load(Ordering::Acquire);
        if head.wrapping_sub(tail) == s.slots.len() {
            return Err(value);
        }
        let slot = &s.slots[head % s.slots.len()];
        // SAFETY: the slot at `head` is outside [tail, head), so the consumer does not touch it
        // until the release store below publishes it. Only this producer writes slots.
        unsafe { (*slot.get()).write(value) };
        s.head.0.store(head.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Whether a push would succeed now (the consumer may make room at any time after).
    pub fn has_room(&self) -> bool {
        let s = &*self.shared;
        let head = s.head.0.load(Ordering::Relaxed);
        head.wrapping_sub(s.tail.0.load(Ordering::Acquire)) < s.slots.len()
    }
}

impl<T: Send> Consumer<T> {
    /// Takes the oldest message, if any.
    pub fn pop(&mut self) -> Option<T> {
        let s = &*self.shared;
        let tail = s.tail.0.load(Ordering::Relaxed);
        let head = s.head.0.load(Ordering::Acquire);
        if tail == head {
            return None;
        }
        let slot = &s.slots[tail % s.slots.len()];
        // SAFETY: the slot at `tail` is inside [tail, head): the producer initialised it and
        // published it with the release store we acquired; it will not write it again until
        // the release store below hands it back.
        let value = unsafe { (*slot.get()).assume_init_read() };
        s.tail.0.store(tail.wrapping_add(1), Ordering::Release);
        Some(value)
    }
}

impl<T: Send> Consumer<T> {
    /// Whether a message is waiting (without taking it).
    pub fn peek_nonempty(&self) -> bool {
        let s = &*self.shared;
        s.tail.0.load(Ordering::Relaxed) != s.head.0.load(Ordering::Acquire)
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        let (mut tail, head) = (*self.tail.0.get_mut(), *self.head.0.get_mut());
        while tail != head {
            let slot = &mut self.slots[tail % self.slots.len()];
            // SAFETY: slots in [tail, head) are initialised and no other thread exists now.
            unsafe { slot.get_mut().assume_init_drop() };
            tail = tail.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_bounded_and_fifo() {
        let (mut p, mut c) = ring(3);
        assert!(p.push(1).is_ok() && p.push(2).is_ok() && p.push(3).is_ok());
        assert_eq!(p.push(4), Err(4), "full");
        assert_eq!(c.pop(), Some(1));
        assert!(p.push(4).is_ok());
        assert_eq!(
            (c.pop(), c.pop(), c.pop(), c.pop()),
            (Some(2), Some(3), Some(4), None)
        );
    }

    #[test]
    fn moves_every_value_once_across_threads() {
        let (mut p, mut c) = ring::<u64>(8);
        const N: u64 = 200_000;
        let t = std::thread::spawn(move || {
            for i in 0..N {
                let mut v = i;
                while let Err(back) = p.push(v) {
                    v = back;
                    std::hint::spin_loop();
                }
            }
        });
        let mut next = 0;
        while next < N {
            if let Some(v) = c.pop() {
                assert_eq!(v, next);
                next += 1;
            }
        }
        t.join().unwrap();
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn drops_what_is_left() {
        let marker = Arc::new(());
        let (mut p, c) = ring(4);
        p.push(marker.clone()).unwrap();
        p.push(marker.clone()).unwrap();
        drop((p, c));
        assert_eq!(Arc::strong_count(&marker), 1);
    }
}
