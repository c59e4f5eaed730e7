//! The socket table of both receive backends: one slot per socket, indexed by a `u32` (the key the
//! kernel hands back with each event or completion), released indices reused first, and the map
//! from the caller's token to its slot.

use std::collections::HashMap;
use std::io;
use std::ops::{Index, IndexMut};

/// Slots of type `T`, a free list of released indices, and the tokens of registered sockets.
///
/// A token is registered ([`SlotTable::insert`]) and unregistered ([`SlotTable::remove_token`])
/// apart from the slot's index being taken ([`SlotTable::vacant`]) and released
/// ([`SlotTable::release`]): a backend may keep a slot busy after its socket is removed (until the
/// kernel is done with it). Slots are never shrunk, so an index stays valid for the table's life.
#[derive(Debug)]
pub(crate) struct SlotTable<T> {
    slots: Vec<T>,
    free: Vec<u32>,
    by_token: HashMap<u64, u32>,
}

impl<T> SlotTable<T> {
    pub(crate) fn new() -> Self {
        SlotTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_token: HashMap::new(),
        }
    }

    /// Registered sockets.
    pub(crate) fn len(&self) -> usize {
        self.by_token.len()
    }

    /// An index for a new socket `token`: a released one if any, else a new slot made by `empty`.
    /// The token is not registered yet ([`SlotTable::insert`] does it); if the socket cannot be
    /// added after all, give the index back with [`SlotTable::release`].
    pub(crate) fn vacant(&mut self, token: u64, empty: impl FnOnce() -> T) -> io::Result<u32> {
        if self.by_token.contains_key(&token) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "MultiRecv::add_socket: token already in use",
            ));
        }
        if let Some(idx) = self.free.pop() {
            return Ok(idx);
        }
        let idx = u32::try_from(self.slots.len())
            .map_err(|_| io::Error::other("MultiRecv: too many sockets"))?;
        self.slots.push(empty());
        Ok(idx)
    }

    /// Registers `token` as the socket in slot `idx` (from [`SlotTable::vacant`]).
    pub(crate) fn insert(&mut self, token: u64, idx: u32) {
        self.by_token.insert(token, idx);
    }

    /// The slot index of the socket `token`.
    pub(crate) fn index_of(&self, token: u64) -> io::Result<u32> {
        self.by_token.get(&token).copied().ok_or_else(unknown_token)
    }

    /// Unregisters the socket `token`; returns its slot index (still taken: see
    /// [`SlotTable::release`]).
    pub(crate) fn remove_token(&mut self, token: u64) -> io::Result<u32> {
        self.by_token.remove(&token).ok_or_else(unknown_token)
    }

    /// Puts `idx` on the free list, for the next [`SlotTable::vacant`].
    pub(crate) fn release(&mut self, idx: u32) {
        self.free.push(idx);
    }

    /// The slot at `idx`, if the table has one.
    pub(crate) fn get(&self, idx: usize) -> Option<&T> {
        self.slots.get(idx)
    }

    /// The slot at `idx`, if the table has one.
    pub(crate) fn get_mut(&mut self, idx: usize) -> Option<&mut T> {
        self.slots.get_mut(idx)
    }
}

impl<T> Index<u32> for SlotTable<T> {
    type Output = T;

    fn index(&self, idx: u32) -> &T {
        &self.slots[idx as usize]
    }
}

impl<T> IndexMut<u32> for SlotTable<T> {
    fn index_mut(&mut self, idx: u32) -> &mut T {
        &mut self.slots[idx as usize]
    }
}

fn unknown_token() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "MultiRecv::remove_socket: unknown token",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_indices_are_reused() {
        let mut t = SlotTable::<Option<u64>>::new();
        let a = t.vacant(10, || None).unwrap();
        t[a] = Some(10);
        t.insert(10, a);
        let b = t.vacant(20, || None).unwrap();
        t.insert(20, b);
        assert_eq!((a, b, t.len()), (0, 1, 2));
        assert_eq!(
            t.vacant(10, || None).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(t.index_of(20).unwrap(), b);
        assert_eq!(t.remove_token(10).unwrap(), a);
        assert_eq!(t.len(), 1);
        // Unregistered but not released: the index is not reused yet.
        assert_eq!(t.vacant(30, || None).unwrap(), 2);
        t.release(a);
        assert_eq!(t.vacant(40, || None).unwrap(), a);
        assert_eq!(t.get(usize::MAX), None);
        assert_eq!(
            t.remove_token(10).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(t.index_of(10).unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
