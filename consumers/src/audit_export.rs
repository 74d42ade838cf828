//! Audit export to SIEM (work in progress).
