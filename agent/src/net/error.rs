//! The error type of pod networking.

use std::io;
use std::path::PathBuf;

use super::Cidr;

/// What failed while setting up, inspecting or tearing down pod networking,
/// and on what.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A pod UID that cannot name a file or a netns.
    #[error("invalid pod uid {uid:?}: {reason}")]
    InvalidPodUid {
        /// The rejected UID.
        uid: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The node's pod CIDR has no room for pod addresses.
    #[error("pod CIDR {cidr} is too small: need at least a /30")]
    PodCidrTooSmall {
        /// The configured pod CIDR.
        cidr: Cidr,
    },
    /// A file-system or syscall step failed; `action` names the step and its object.
    #[error("{action}: {source}")]
    Io {
        /// E.g. "bind-mount netns of pod 1234 at /run/weir/netns/n1/1234".
        action: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A netlink request failed; `action` names the request and its object.
    #[error("{action}: {source}")]
    Netlink {
        /// E.g. "create veth weir1a2b3c4d5e6 for pod 1234".
        action: String,
        /// The underlying error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The thread that works inside a pod netns died without an answer.
    #[error("{action}: netns worker thread panicked")]
    WorkerPanicked {
        /// What the thread was doing.
        action: String,
    },
    /// The IPAM state file is not valid JSON of the expected shape.
    #[error("parse IPAM state {path}: {source}")]
    IpamParse {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The IPAM state file parses but contradicts itself or the configuration.
    #[error("IPAM state {path} is unusable: {reason}")]
    IpamInvalid {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Every pod address of the node is leased.
    #[error("allocate IP for pod {pod}: all {leases} addresses of pod CIDR {cidr} are leased")]
    IpamExhausted {
        /// The pod that got no address.
        pod: String,
        /// The node's pod CIDR.
        cidr: Cidr,
        /// How many leases exist.
        leases: usize,
    },
    /// A pod's network exists only partly where it must be whole.
    #[error("pod {pod} network is inconsistent: {reason}")]
    Inconsistent {
        /// The pod.
        pod: String,
        /// What is missing or wrong.
        reason: String,
    },
}

impl NetError {
    pub(crate) fn io(action: impl Into<String>, source: impl Into<io::Error>) -> Self {
        NetError::Io {
            action: action.into(),
            source: source.into(),
        }
    }

    pub(crate) fn netlink(action: impl Into<String>, source: rtnetlink::Error) -> Self {
        NetError::Netlink {
            action: action.into(),
            source,
        }
    }
}

/// The errno of a netlink error reply, if it is one (positive, like `libc::ENODEV`).
pub(crate) fn netlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}
