//! Istio's traffic management (`networking.istio.io` VirtualService and DestinationRule),
//! decided on the **source** side as a sidecar would decide it (docs/traffic.md). This module
//! is the resources' meaning and nothing else (no sockets, no clock): the snapshot indexes
//! them and answers [`Snapshot::http_route`](crate::state::Snapshot::http_route),
//! [`Snapshot::tcp_route`](crate::state::Snapshot::tcp_route) and
//! [`Snapshot::destination_policy`](crate::state::Snapshot::destination_policy); the outbound
//! side applies the answers; `ztunnel route check` prints them.
//!
//! # What the data path must do with a decision
//!
//! [`HttpDecision`] (one per request, from the request as the client sent it):
//! * `NoVirtualService`: plain behaviour, to the Service the client addressed, on its port.
//!   The DestinationRule's [`TrafficPolicy`] (from `destination_policy`) still applies.
//! * `NoRoute`: a VirtualService applies but no route matched: answer `404` (Envoy's `NR`).
//! * `Redirect`: answer `status` with `Location: location`; nothing goes upstream.
//! * `DirectResponse`: answer `status` with `body`; nothing goes upstream.
//! * `Routed(RouteAction)`, in this order:
//!   1. `fault`: with probability `delay.percentage` wait `delay.duration` (flag `DI`); then
//!      with probability `abort.percentage` answer `abort.status` without going upstream
//!      (flag `FI`). The two draws are independent ([`Share::draw`]).
//!   2. pick one of `destinations` by `weight` (weights are relative: split by their total,
//!      never assumed to add up to 100). A destination whose `target` is `Err` answers `503`
//!      with that reason (Envoy's `NC`, no cluster), logged.
//!   3. endpoints of the picked [`Cluster`]: the Service port's endpoints whose pod labels the
//!      `subset` selects ([`Snapshot::cluster_endpoints`](crate::state::Snapshot::cluster_endpoints)),
//!      balanced by `cluster.policy.load_balancer`, limited by `cluster.policy.connection_pool`,
//!      ejected by `cluster.policy.outlier_detection`. No endpoint: `503` (`UH`).
//!   4. `rewrite.path` / `rewrite.authority` replace `:path` (query kept by the decision) and
//!      `:authority`/`Host` (a route-level `headers.request.set` of `host` is folded into
//!      `rewrite.authority`); then `headers.request` edits, then the picked destination's
//!      `headers.request` (its `headers.authority`, a `host` it sets, replaces the authority);
//!      the response gets `headers.response` then the destination's.
//!   5. `timeout` bounds the whole request including retries (`None`: no timeout);
//!      `retries` re-sends on the [`RetryOn`] conditions, each try bounded by
//!      `per_try_timeout`, at most `attempts` more tries (flag `URX` when exhausted).
//!   6. each `mirrors` entry, with probability `percentage`: a copy of the request sent
//!      fire-and-forget to its cluster, `Host` suffixed `-shadow`, its response dropped.
//!
//! [`TcpDecision`] (opaque traffic, per connection): `Routed` picks a destination by weight as
//! above and dials the picked cluster's endpoints; `NoRoute` closes the connection.
//!
//! * [`virtual_service`]: routes and their matches, which route a request or connection takes;
//! * [`destination_rule`]: subsets, and the traffic policy merged per cluster;
//! * [`retry`]: `retries` with Envoy's `retryOn` conditions and Istio's defaults;
//! * [`string_match`], [`re2`], [`values`]: the value types, checked where they are read.
pub mod decision;
pub mod destination_rule;
pub mod re2;
pub mod retry;
pub mod string_match;
pub mod values;
pub mod virtual_service;

pub use decision::{
    AbortFault, Cluster, Conflict, Delay, FaultAction, HttpDecision, HttpRouteRequest,
    MirrorAction, ObjectRef, RewriteAction, RouteAction, RouteRef, SourceWorkload, TcpDecision,
    Unroutable, WeightedCluster,
};
pub use destination_rule::{
    ConnectionPool, DestinationRule, HashKey, LoadBalancer, OutlierDetection, Subset, TrafficPolicy,
};
pub use retry::{RetryOn, RetryPolicy};
pub use values::Share;
pub use virtual_service::{Abort, HeaderEdits, HeaderOps, VirtualService};
