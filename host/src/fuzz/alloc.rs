//! The allocation watch of the fuzz targets: the test binary's allocator,
//! which notes the largest single allocation a thread asks for while it
//! runs a target's reader. A reader that believes a length field and
//! reserves gigabytes for a short input then fails its target, instead of
//! passing unnoticed on a machine with memory to spare.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Watched;

#[global_allocator]
static ALLOCATOR: Watched = Watched;

thread_local! {
    // Const-initialised and without destructors, so reading them never
    // allocates, which an allocator must not do.
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let watching = WATCHING.try_with(Cell::get).unwrap_or(false);
    if watching {
        let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
    }
}

// SAFETY: every call is passed on unchanged to the system allocator; the
// bookkeeping beside it neither allocates nor unwinds.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's guarantees for `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `work` and returns what it returned and the largest single
/// allocation it asked for on this thread.
pub fn largest_during<T>(work: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.set(0);
    WATCHING.set(true);
    let result = work();
    WATCHING.set(false);
    (result, LARGEST.get())
}
