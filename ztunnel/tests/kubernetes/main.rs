//! The Kubernetes configuration source and the CA's TokenReview authentication, against a
//! Kubernetes API served over HTTP by the test itself (no cluster, no root-only set-up).
mod apiserver;
mod ca;
mod pod_netns;
mod source;
mod support;
