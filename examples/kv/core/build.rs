//! The client and server of `kv.v1.Kv`, generated from the service below: no `.proto` file and
//! no `protoc` (the messages are written with `prost`'s derive in `src/lib.rs`).

fn main() {
    let method = |name: &str, route: &str, input: &str, output: &str| {
        tonic_build::manual::Method::builder()
            .name(name)
            .route_name(route)
            .input_type(input)
            .output_type(output)
            .codec_path("tonic_prost::ProstCodec")
            .build()
    };
    let service = tonic_build::manual::Service::builder()
        .name("Kv")
        .package("kv.v1")
        .method(method("get", "Get", "crate::GetRequest", "crate::GetReply"))
        .method(method("put", "Put", "crate::PutRequest", "crate::PutReply"))
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
