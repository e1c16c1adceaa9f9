# The Offset relay's Cap'n Proto messages (docs/protocol.md section 8), as the reference
# `capnp` tool needs them to encode and decode test fixtures.
@0xc5f1a7e2b3d40981;

struct Buffer128 {
    x0 @0: UInt64;
    x1 @1: UInt64;
}

struct Buffer256 {
    x0 @0: UInt64;
    x1 @1: UInt64;
    x2 @2: UInt64;
    x3 @3: UInt64;
}

struct Buffer512 {
    x0 @0: UInt64;
    x1 @1: UInt64;
    x2 @2: UInt64;
    x3 @3: UInt64;
    x4 @4: UInt64;
    x5 @5: UInt64;
    x6 @6: UInt64;
    x7 @7: UInt64;
}

struct PublicKey {
    inner @0: Buffer256;
}

struct DhPublicKey {
    inner @0: Buffer256;
}

struct Salt {
    inner @0: Buffer256;
}

struct Signature {
    inner @0: Buffer512;
}

struct RandValue {
    inner @0: Buffer128;
}

struct InitConnection {
    union {
        listen @0: Void;
        accept @1: PublicKey;
        connect @2: PublicKey;
    }
}

struct RejectConnection {
    publicKey @0: PublicKey;
}

struct IncomingConnection {
    publicKey @0: PublicKey;
}

struct KaMessage {
    union {
        keepAlive @0: Void;
        message @1: Data;
    }
}

struct ExchangeRandNonce {
    randNonce @0: RandValue;
    srcPublicKey @1: PublicKey;
    optDestPublicKey: union {
        empty @2: Void;
        publicKey @3: PublicKey;
    }
}

struct ExchangeDh {
    dhPublicKey @0: DhPublicKey;
    randNonce @1: RandValue;
    keySalt @2: Salt;
    signature @3: Signature;
}

struct Rekey {
    dhPublicKey @0: DhPublicKey;
    keySalt @1: Salt;
}

struct ChannelContent {
    union {
        rekey @0: Rekey;
        user @1: Data;
    }
}

struct ChannelMessage {
    randPadding @0: Data;
    content @1: ChannelContent;
}
