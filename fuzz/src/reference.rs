//! Fuzzes `imaged::reference::Reference::parse`, which reads image names straight from CRI
//! requests and CLI arguments. Any input must parse or be refused without a panic, and a
//! reference that parses must print (its normalised form) to text that parses back to the
//! same value, since that text is what imaged stores and hands to the kubelet.

use imaged::reference::Reference;

/// One input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(reference) = Reference::parse(text) else {
        return;
    };
    let printed = reference.to_string();
    let again = Reference::parse(&printed)
        .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which is refused: {e}"));
    assert_eq!(
        again, reference,
        "{text:?} printed as {printed:?}, which parses to another reference"
    );
}
