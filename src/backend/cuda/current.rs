//! Putting back the thread's current CUDA context after each of mulo's CUDA calls.
//!
//! cudarc makes its context current on the calling thread (`cuCtxSetCurrent`) when it creates
//! one and before each of its operations (allocation, copy, launch), and leaves it current. A
//! host that uses the CUDA runtime API, as PyTorch does, takes its current device from the
//! thread's current context: a step of tensors on `cuda:1` would leave
//! `torch.cuda.current_device()` at 1, and with it `'cuda'` allocations and
//! `torch.cuda.current_stream()`. So every public entry point of mulo's CUDA backend that
//! calls the driver holds a [`RestoreCurrent`], which puts back, on return or unwind, the
//! context the thread had before the call (none included).
//!
//! The logic is generic over the [`ContextSlot`] it saves and restores, so that it is
//! unit-tested without a driver; [`Driver`] is the thread's slot in the CUDA driver.

use cudarc::driver::sys::{self, CUresult};

/// Where a thread's current context lives: the driver's per-thread slot, or a test's fake.
pub trait ContextSlot {
    /// A context handle (`CUcontext`; a null one is "no context").
    type Ctx: Copy + PartialEq + std::fmt::Debug;
    /// The thread's current context, `None` when it cannot be read (then nothing is restored).
    fn current(&self) -> Option<Self::Ctx>;
    /// Makes `ctx` the thread's current context.
    fn make_current(&self, ctx: Self::Ctx);
}

/// The calling thread's current context in the CUDA driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct Driver;

impl ContextSlot for Driver {
    /// The `CUcontext`'s address (an integer, so that a guard can be a field of a `Send`
    /// type: [`RestoreAfterFields`]).
    type Ctx = usize;

    fn current(&self) -> Option<usize> {
        if !super::nvrtc::driver_available() {
            return None; // no driver: no call of mulo's can change a context either
        }
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: one out-pointer, valid for the call; the library is present (checked).
        match unsafe { sys::cuCtxGetCurrent(&mut ctx) } {
            CUresult::CUDA_SUCCESS => Some(ctx as usize),
            // Before cuInit no context can be current: restore "none" after the call.
            CUresult::CUDA_ERROR_NOT_INITIALIZED => Some(0),
            _ => None,
        }
    }

    fn make_current(&self, ctx: usize) {
        // SAFETY: `ctx` was the thread's current context when the guard was made (or null),
        // and every context mulo creates outlives the calls that hold a guard. A failure
        // leaves the thread as the call left it; there is nothing better to do in a drop.
        let _ = unsafe { sys::cuCtxSetCurrent(ctx as sys::CUcontext) };
    }
}

/// Saves the thread's current context when made and makes it current again when dropped, if
/// something changed it. Drop it on the thread that made it: the slot it restores is that
/// thread's.
#[must_use = "the context is restored when the guard is dropped"]
#[derive(Debug)]
pub struct RestoreCurrent<S: ContextSlot = Driver> {
    slot: S,
    saved: Option<S::Ctx>,
}

/// A field to declare last in a type whose other fields free CUDA resources when dropped
/// (which binds their context, after the type's own `Drop::drop` has returned): the type's
/// `drop` calls [`arm`](Self::arm), and this field, dropped after the others, puts back the
/// context the thread had when `drop` began.
#[derive(Debug)]
pub struct RestoreAfterFields<S: ContextSlot = Driver>(Option<RestoreCurrent<S>>);

impl<S: ContextSlot> Default for RestoreAfterFields<S> {
    fn default() -> Self {
        RestoreAfterFields(None)
    }
}

impl RestoreAfterFields<Driver> {
    /// Saves the thread's current context, to restore when this field drops.
    pub fn arm(&mut self) {
        self.arm_with(Driver);
    }
}

impl<S: ContextSlot> RestoreAfterFields<S> {
    /// Saves `slot`'s current context, to restore when this field drops.
    pub fn arm_with(&mut self, slot: S) {
        self.0 = Some(RestoreCurrent::of(slot));
    }
}

impl RestoreCurrent<Driver> {
    /// A guard of the calling thread's current context in the driver.
    pub fn new() -> Self {
        Self::of(Driver)
    }
}

impl Default for RestoreCurrent<Driver> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: ContextSlot> RestoreCurrent<S> {
    /// A guard of `slot`'s current context.
    pub fn of(slot: S) -> Self {
        let saved = slot.current();
        RestoreCurrent { slot, saved }
    }
}

impl<S: ContextSlot> Drop for RestoreCurrent<S> {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            if self.slot.current() != Some(saved) {
                self.slot.make_current(saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A fake slot: the current context (0: none) and every `make_current` call.
    #[derive(Default)]
    struct Fake {
        current: Cell<u32>,
        readable: Cell<bool>,
        sets: RefCell<Vec<u32>>,
    }

    impl ContextSlot for &Fake {
        type Ctx = u32;
        fn current(&self) -> Option<u32> {
            self.readable.get().then(|| self.current.get())
        }
        fn make_current(&self, ctx: u32) {
            self.sets.borrow_mut().push(ctx);
            self.current.set(ctx);
        }
    }

    fn fake(current: u32) -> Fake {
        let f = Fake::default();
        f.current.set(current);
        f.readable.set(true);
        f
    }

    #[test]
    fn the_context_before_the_call_is_current_after_it() {
        // A call that binds another device's context (as cudarc does), from context 1 and
        // from none.
        for before in [1, 0] {
            let f = fake(before);
            {
                let _g = RestoreCurrent::of(&f);
                f.current.set(2);
            }
            assert_eq!(f.current.get(), before);
            assert_eq!(*f.sets.borrow(), vec![before]);
        }
    }

    #[test]
    fn an_unchanged_context_is_not_set_again() {
        let f = fake(3);
        drop(RestoreCurrent::of(&f));
        assert!(f.sets.borrow().is_empty());
    }

    #[test]
    fn the_context_is_restored_on_an_early_error_and_on_a_panic() {
        let f = fake(1);
        let call = |fail: bool| -> Result<(), ()> {
            let _g = RestoreCurrent::of(&f);
            f.current.set(5);
            if fail {
                return Err(());
            }
            f.current.set(6);
            Ok(())
        };
        assert!(call(true).is_err());
        assert_eq!(f.current.get(), 1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _g = RestoreCurrent::of(&f);
            f.current.set(7);
            panic!("a failing call");
        }));
        assert!(r.is_err());
        assert_eq!(f.current.get(), 1);
    }

    #[test]
    fn nested_guards_restore_in_order() {
        let f = fake(1);
        {
            let _outer = RestoreCurrent::of(&f);
            f.current.set(2);
            {
                let _inner = RestoreCurrent::of(&f);
                f.current.set(3);
            }
            assert_eq!(f.current.get(), 2);
        }
        assert_eq!(f.current.get(), 1);
    }

    #[test]
    fn an_unreadable_slot_is_left_alone() {
        let f = fake(1);
        f.readable.set(false);
        {
            let _g = RestoreCurrent::of(&f);
            f.current.set(2);
        }
        assert_eq!(f.current.get(), 2);
        assert!(f.sets.borrow().is_empty());
    }

    /// A type whose fields bind another context when they drop, after its `drop` returned:
    /// the last field, armed in `drop`, restores the context the thread had.
    #[test]
    fn restore_after_fields_runs_after_the_other_fields() {
        struct Binds<'a>(&'a Fake);
        impl Drop for Binds<'_> {
            fn drop(&mut self) {
                self.0.current.set(9); // as freeing device memory binds its context
            }
        }
        struct Owner<'a> {
            _memory: Binds<'a>,
            restore: RestoreAfterFields<&'a Fake>,
            slot: &'a Fake,
        }
        impl Drop for Owner<'_> {
            fn drop(&mut self) {
                self.restore.arm_with(self.slot);
            }
        }
        let f = fake(4);
        drop(Owner {
            _memory: Binds(&f),
            restore: RestoreAfterFields::default(),
            slot: &f,
        });
        assert_eq!(f.current.get(), 4);
        assert_eq!(*f.sets.borrow(), vec![4]);
    }

    /// Without a driver (or before any context exists) the guard changes nothing and does
    /// not fail.
    #[test]
    fn the_driver_guard_is_harmless_without_a_context() {
        let before = Driver.current();
        drop(RestoreCurrent::new());
        assert_eq!(Driver.current(), before);
    }
}
