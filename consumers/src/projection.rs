//! Projection framework (work in progress).
