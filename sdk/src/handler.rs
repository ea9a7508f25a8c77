//! The macros that turn a plain function into the component's exports,
//! `handle` and `handle-batch`.

/// Exports `$handler` as this component's `handle` function, and a
/// `handle-batch` that calls it for each message of a batch.
///
/// `$handler` is anything callable as
/// `fn(Message) -> Result<Vec<Outgoing>, Failure>`. Use it (or
/// [`batch_handler!`](crate::batch_handler)) exactly once per plugin crate,
/// which must be built as a `cdylib` for `wasm32-wasip2`.
///
/// In a batch, [`publish`](crate::publish) keeps the message with the
/// outputs of the message being handled, so it is published if that message
/// succeeds, as with one message per call.
///
/// ```ignore
/// fn pass(msg: sluice_sdk::Message)
///     -> Result<Vec<sluice_sdk::Outgoing>, sluice_sdk::Failure> {
///     Ok(vec![msg.forward_to("out")])
/// }
/// sluice_sdk::handler!(pass);
/// ```
#[macro_export]
macro_rules! handler {
    ($handler:expr $(,)?) => {
        // An anonymous const keeps the glue type out of the plugin's
        // namespace while still giving the export functions a type to name.
        const _: () = {
            struct SluiceHandler;

            impl $crate::bindings::Guest for SluiceHandler {
                fn handle(
                    msg: $crate::Message,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Outgoing>, $crate::Failure>
                {
                    $handler(msg)
                }

                fn handle_batch(
                    msgs: ::std::vec::Vec<$crate::Message>,
                ) -> ::std::vec::Vec<
                    ::core::result::Result<::std::vec::Vec<$crate::Outgoing>, $crate::Failure>,
                > {
                    $crate::batch::each(msgs, |msg| $handler(msg))
                }
            }

            // `with_types_in` names the bindings via `$crate`, so the plugin
            // may rename its dependency on this SDK.
    $crate::bindings::export!(SluiceHandler with_types_in $crate::bindings);
        };
    };
}

/// Exports `$handler`, a function over a batch of messages, as this
/// component's `handle-batch`, and a `handle` that gives it one message.
///
/// `$handler` is anything callable as
/// `fn(Vec<Message>) -> Vec<Result<Vec<Outgoing>, Failure>>`: one result per
/// message, in order (the host fails the whole batch otherwise). Use it when
/// a batch lets the handler share work between its messages; otherwise
/// [`handler!`](crate::handler) batches just as well.
///
/// [`publish`](crate::publish) is refused during a batch: put each
/// message's outputs in its own result.
///
/// ```ignore
/// use sluice_sdk::prelude::*;
///
/// fn pass_all(msgs: Vec<Message>) -> Vec<Result<Vec<Outgoing>, Failure>> {
///     msgs.into_iter().map(|m| Ok(vec![m.forward_to("out")])).collect()
/// }
/// batch_handler!(pass_all);
/// ```
#[macro_export]
macro_rules! batch_handler {
    ($handler:expr $(,)?) => {
        const _: () = {
            struct SluiceHandler;

            impl $crate::bindings::Guest for SluiceHandler {
                fn handle(
                    msg: $crate::Message,
                ) -> ::core::result::Result<::std::vec::Vec<$crate::Outgoing>, $crate::Failure>
                {
                    $crate::batch::one(msg, |msgs| $handler(msgs))
                }

                fn handle_batch(
                    msgs: ::std::vec::Vec<$crate::Message>,
                ) -> ::std::vec::Vec<
                    ::core::result::Result<::std::vec::Vec<$crate::Outgoing>, $crate::Failure>,
                > {
                    $handler(msgs)
                }
            }

    $crate::bindings::export!(SluiceHandler with_types_in $crate::bindings);
        };
    };
}
