//! imaged
