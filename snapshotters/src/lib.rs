//! snapshotters
