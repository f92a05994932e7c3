//! A buffer's first value, shared by tasks that each write their own part of it.

/// `y`'s first value (or a packed buffer's), shared by tasks that write disjoint
/// parts of it.
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);
// SAFETY: tasks write disjoint values through it, and the owner of the buffer waits
// for every task before it reads the buffer again.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

impl Out {
    /// The address `i` values on (a method, so that closures capture the whole
    /// `Out`, which may cross threads, and not its pointer).
    pub(super) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
