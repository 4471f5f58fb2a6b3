//! SPDY/3.1, as much of it as a server of Kubernetes' streaming protocols needs: frames,
//! header blocks and a session that accepts the streams a client opens.

pub mod frame;
pub mod headers;
pub mod session;

pub use headers::Headers;
pub use session::{Closed, Session, Stream, StreamWriter};
