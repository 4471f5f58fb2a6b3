//! CNI: the pod network's configuration ([`config`]) and the calls that attach a pod's
//! network namespace to it and detach it again ([`invoke`]).

pub mod config;
pub mod invoke;

pub use config::{CniConfigError, NetworkList, load};
pub use invoke::{Attachment, CniError, CniResult, Network};
