//! A valid component that implements some other world, not Sluice's
//! `handler`: the host's tests load it to check that it is refused cleanly.

wit_bindgen::generate!({
    inline: "
        package other:thing;

        world thing {
            export process: func(x: string) -> string;
        }
    ",
});

struct Thing;

impl Guest for Thing {
    fn process(x: String) -> String {
        x
    }
}

export!(Thing);
