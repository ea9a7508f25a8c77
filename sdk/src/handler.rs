//! The `handler!` macro that turns a plain function into the component's
//! exported `handle`.

/// Exports `$handler` as this component's `handle` function.
///
/// `$handler` is anything callable as
/// `fn(Message) -> Result<Vec<Outgoing>, Failure>`. Use it exactly once per
/// plugin crate, which must be built as a `cdylib` for `wasm32-wasip2`.
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
            }

            // `with_types_in` names the bindings via `$crate`, so the plugin
            // may rename its dependency on this SDK.
    $crate::bindings::export!(SluiceHandler with_types_in $crate::bindings);
        };
    };
}
