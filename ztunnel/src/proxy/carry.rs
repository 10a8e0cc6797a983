//! What an established connection keeps while its bytes flow, apart from what set it up.
//!
//! Setting a connection up (the plan, admission, the dial, the CONNECT) takes large futures;
//! carrying it takes a relay and its records. Written as one `async fn`, the set-up's state
//! would size the connection's task for its whole life (7 KiB per idle HBONE stream on the
//! destination's side, measured). So every path is split in two: a set-up future, boxed and
//! freed once it is done, that returns a [`Carry`]; and the carry, which is all an idle
//! connection keeps.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use super::record::ConnectionRecord;
use crate::{capture::return_path::ReturnPath, relay::Relayed};

/// An established connection: its relay and its records, which it finishes (log line,
/// metrics) when the relay ends.
pub struct Carry {
    record: ConnectionRecord,
    /// The caller side's record, when this proxy serves both ends (same node); boxed, as
    /// most connections have none.
    caller: Option<Box<ConnectionRecord>>,
    relay: Pin<Box<dyn Future<Output = Relayed> + Send>>,
    /// The pod netns's return path for a delivery from the caller's address: held until the
    /// connection ends, so an un-enrolment does not cut the replies of connections it leaves.
    return_path: Option<Arc<ReturnPath>>,
}

impl Carry {
    pub fn new(
        record: ConnectionRecord,
        caller: Option<ConnectionRecord>,
        relay: impl Future<Output = Relayed> + Send + 'static,
    ) -> Self {
        Self {
            record,
            caller: caller.map(Box::new),
            relay: Box::pin(relay),
            return_path: None,
        }
    }

    /// Keeps `return_path` for as long as the connection is carried.
    pub fn holding(mut self, return_path: Option<Arc<ReturnPath>>) -> Self {
        self.return_path = return_path;
        self
    }
}

impl Future for Carry {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let r = ready!(this.relay.as_mut().poll(cx));
        this.record.finish(&r);
        if let Some(c) = &mut this.caller {
            c.finish(&r);
        }
        Poll::Ready(())
    }
}

/// Something a relay must keep alive until it ends (the pooled stream's place on its HBONE
/// connection).
pub struct Holding<F, K> {
    relay: F,
    _keep: K,
}

impl<F, K> Holding<F, K> {
    pub fn new(relay: F, keep: K) -> Self {
        Self { relay, _keep: keep }
    }
}

impl<F: Future + Unpin, K: Unpin> Future for Holding<F, K> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        Pin::new(&mut self.relay).poll(cx)
    }
}

/// Runs `set_up` (boxed, and freed once done), then the connection it established, if any.
pub fn set_up_then_carry<S>(set_up: S) -> SetUpThenCarry<S>
where
    S: Future<Output = Option<Carry>>,
{
    SetUpThenCarry::SettingUp(Box::pin(set_up))
}

/// The task of one connection: [`set_up_then_carry`]. The carry is inline on purpose: it is
/// what the task is for (boxing it would add an allocation per connection).
#[allow(clippy::large_enum_variant)]
pub enum SetUpThenCarry<S> {
    SettingUp(Pin<Box<S>>),
    Carrying(Carry),
    Done,
}

impl<S: Future<Output = Option<Carry>>> Future for SetUpThenCarry<S> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Unpin: the set-up is boxed, a carry holds boxes and records.
        let this = self.get_mut();
        loop {
            match this {
                SetUpThenCarry::SettingUp(set_up) => match ready!(set_up.as_mut().poll(cx)) {
                    Some(carry) => *this = SetUpThenCarry::Carrying(carry),
                    None => {
                        *this = SetUpThenCarry::Done;
                        return Poll::Ready(());
                    }
                },
                SetUpThenCarry::Carrying(carry) => {
                    ready!(Pin::new(carry).poll(cx));
                    // The records log and count the connection closed now.
                    *this = SetUpThenCarry::Done;
                    return Poll::Ready(());
                }
                SetUpThenCarry::Done => return Poll::Ready(()),
            }
        }
    }
}
