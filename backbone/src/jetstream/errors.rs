//! async-nats errors into [`BackboneError`], keeping the error whole and deciding from its
//! kind (and, for JetStream API errors, the server's error code) whether a retry may help.
//!
//! The rule: a refusal that names the request (a bad name, a missing stream, a subject
//! overlap, a payload too large) is permanent; anything about reaching the server or its
//! cluster (time-outs, no responders, a lost connection, a stream or consumer leader being
//! elected) is transient. A kind we cannot place is transient, as a lost connection is: the
//! engine retries within its time budget and reports the last error when it runs out.

use async_nats::jetstream::{consumer, context, stream};
use async_nats::jetstream::{Error as ApiError, ErrorCode};

use crate::BackboneError;

/// Whether an error of this kind may go away on its own.
pub(crate) trait Classify {
    fn transient(&self) -> bool;
}

/// JetStream API error codes that describe a passing state of the server or its cluster.
pub(crate) fn transient_code(api: &ApiError) -> bool {
    matches!(
        api.error_code(),
        ErrorCode::CLUSTER_NOT_AVAILABLE
            | ErrorCode::CLUSTER_NO_PEERS
            | ErrorCode::CLUSTER_NOT_ACTIVE
            | ErrorCode::CLUSTER_NOT_ASSIGNED
            | ErrorCode::CLUSTER_NOT_LEADER
            | ErrorCode::CLUSTER_INCOMPLETE
            | ErrorCode::CLUSTER_SERVER_MEMBER_CHANGE_INFLIGHT
            | ErrorCode::INSUFFICIENT_RESOURCES
            | ErrorCode::STREAM_OFFLINE
            | ErrorCode::CONSUMER_OFFLINE
            | ErrorCode::PEER_REMAP
    )
}

macro_rules! classify {
    ($($kind:ty => |$k:ident| $transient:expr;)*) => {
        $(
            impl Classify for $kind {
                fn transient(&self) -> bool {
                    #[allow(unused_imports)]
                    use $kind as K;
                    let $k = self;
                    $transient
                }
            }
        )*
    };
}

classify! {
    // StreamNotFound is also what a cluster electing a leader answers ("no responders"); the
    // engine asks the server whether the stream exists before it gives up on a publish.
    context::PublishErrorKind => |k| matches!(k, K::StreamNotFound | K::TimedOut | K::BrokenPipe | K::MaxAckPending | K::Other);
    context::RequestErrorKind => |k| matches!(k, K::TimedOut | K::NoResponders | K::Other);
    context::GetStreamErrorKind => |k| match k {
        K::Request => true,
        K::JetStream(api) => transient_code(api),
        _ => false,
    };
    context::CreateStreamErrorKind => |k| match k {
        K::JetStreamUnavailable | K::TimedOut | K::Response => true,
        K::JetStream(api) => transient_code(api),
        _ => false,
    };
    context::ConsumerInfoErrorKind => |k| match k {
        K::Offline | K::Request | K::TimedOut | K::NoResponders => true,
        K::JetStream(api) => transient_code(api),
        _ => false,
    };
    stream::ConsumerErrorKind => |k| match k {
        K::TimedOut | K::Request | K::Other => true,
        K::JetStream(api) => transient_code(api),
        _ => false,
    };
    stream::PurgeErrorKind => |k| match k {
        K::Request | K::TimedOut => true,
        K::JetStream(api) => transient_code(api),
    };
    stream::LastRawMessageErrorKind => |k| match k {
        K::Other => true,
        K::JetStream(api) => transient_code(api),
        _ => false,
    };
    consumer::StreamErrorKind => |_k| true;
    consumer::pull::BatchErrorKind => |k| !matches!(k, K::Serialize);
    consumer::pull::OrderedErrorKind => |k| !matches!(k, K::PushBasedConsumer | K::RequestLimitExceeded);
    consumer::pull::MessagesErrorKind => |k| !matches!(k, K::PushBasedConsumer | K::RequestLimitExceeded);
    async_nats::ConnectErrorKind => |k| matches!(k, K::Dns | K::TimedOut | K::Io | K::MaxReconnects);
    async_nats::client::FlushErrorKind => |_k| true;
    async_nats::jetstream::message::StreamMessageErrorKind => |_k| false;
}

impl<K> From<async_nats::error::Error<K>> for BackboneError
where
    K: Classify + Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
{
    fn from(e: async_nats::error::Error<K>) -> Self {
        BackboneError::Nats { transient: e.kind().transient(), source: Box::new(e) }
    }
}
