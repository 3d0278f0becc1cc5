//! Bytes from an upstream broker, as the bridge frames and reads them:
//! packets cut at any point, remaining lengths of any size, PUBLISH bodies
//! of any shape. No input may panic, and a frame is never taken before it
//! is whole or when it announces more than the bridge accepts.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use m2m_router::bridge::{next_frame, parse_command, Frame, MAX_UPSTREAM_PACKET};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(stream.len());
    let mut buf = BytesMut::new();
    for piece in [&stream[..cut], &stream[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match next_frame(&mut buf) {
                Frame::Whole(first, body) => {
                    assert!(body.len() <= MAX_UPSTREAM_PACKET);
                    assert!(before - buf.len() >= 2 + body.len());
                    if let Some(command) = parse_command(first, body.clone(), "site/") {
                        assert!(command.topic.len() + command.payload.len() <= body.len());
                        assert!(std::str::from_utf8(&command.topic).is_ok());
                    }
                }
                Frame::Partial => {
                    assert_eq!(buf.len(), before, "a partial frame consumed bytes");
                    break;
                }
                Frame::Malformed | Frame::TooLarge(_) => return,
            }
        }
    }
});
