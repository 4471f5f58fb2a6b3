//! The CRI image service as served: the generated server, except that ListImages answers
//! with the encoding [`ImageService::list_encoded`] keeps, so a call costs a copy of bytes
//! rather than building, encoding and dropping a message per image.

use super::{CriImageService, list_filter, status};
use crate::service::ImageService;
use bytes::{BufMut as _, Bytes};
use proto::cri::{self, image_service_server::ImageServiceServer};
use std::convert::Infallible;
use std::sync::Arc;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

/// The gRPC path of ListImages.
const LIST_IMAGES: &str = "/runtime.v1.ImageService/ListImages";

/// `runtime.v1.ImageService`: ListImages from the kept encoding, every other call through
/// the generated server.
#[derive(Clone)]
pub struct ImageServer {
    generated: ImageServiceServer<CriImageService>,
    service: Arc<ImageService>,
}

impl ImageServer {
    /// The CRI image service over `service`.
    pub fn new(service: Arc<ImageService>) -> Self {
        Self {
            generated: ImageServiceServer::new(CriImageService::new(service.clone())),
            service,
        }
    }
}

impl NamedService for ImageServer {
    const NAME: &'static str = <ImageServiceServer<CriImageService> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for ImageServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != LIST_IMAGES {
            return self.generated.call(request);
        }
        let list = List(self.service.clone());
        Box::pin(async move { Ok(Grpc::new(ListCodec).unary(list, request).await) })
    }
}

/// ListImages, answered with the encoded response.
struct List(Arc<ImageService>);

impl UnaryService<cri::ListImagesRequest> for List {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<cri::ListImagesRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            let request = request.into_inner();
            let encoded = service
                .list_encoded(list_filter(&request))
                .map_err(|e| status::to_status(&e))?;
            Ok(Response::new(encoded))
        })
    }
}

/// Decodes a ListImagesRequest; "encodes" a response that is protobuf already.
struct ListCodec;

impl Codec for ListCodec {
    type Encode = Bytes;
    type Decode = cri::ListImagesRequest;
    type Encoder = ListCodec;
    type Decoder = ListCodec;

    fn encoder(&mut self) -> Self::Encoder {
        ListCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        ListCodec
    }
}

impl Encoder for ListCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ListCodec {
    type Item = cri::ListImagesRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        use prost::Message as _;
        cri::ListImagesRequest::decode(src)
            .map(Some)
            // What the generated server's codec answers for a request it cannot decode.
            .map_err(|e| Status::internal(e.to_string()))
    }
}
