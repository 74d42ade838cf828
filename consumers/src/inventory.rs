//! Inventory view (work in progress).
