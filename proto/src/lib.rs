//! Generated protobuf and gRPC code for Tally. Nothing here is written by hand but this file.
//!
//! Layout (mirrors the proto packages):
//! - [`envoy`]: the Envoy RLS v3 subset (`envoy.service.ratelimit.v3`), the ext_authz v3 subset
//!   (`envoy.service.auth.v3`) and the messages they use.
//! - [`google`]: `google.rpc.Status` (ext_authz's CheckResponse status).
//! - [`kuadrant`]: Limitador's `kuadrant.service.ratelimit.v1` (CheckRateLimit, Report).
//! - [`tally`]: Tally's own `tally.v1` API (every `tally/v1/*.proto` shares the package, so
//!   `Admin`, `Usage`, `Cluster`, ... all live in [`tally::v1`]).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection.

#![allow(clippy::all, missing_docs)]

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
        pub mod auth {
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod kuadrant {
    pub mod service {
        pub mod ratelimit {
            pub mod v1 {
                tonic::include_proto!("kuadrant.service.ratelimit.v1");
            }
        }
    }
}

pub mod tally {
    pub mod v1 {
        tonic::include_proto!("tally.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Tally proto, for the gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tally_descriptor");
