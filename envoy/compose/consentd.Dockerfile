# consentd and consentctl, built from this repository (context: the repo root).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p consent-control-plane --bins

FROM debian:bookworm-slim
COPY --from=build /src/target/release/consentd /src/target/release/consentctl /usr/local/bin/
EXPOSE 7070 9090
ENTRYPOINT ["consentd"]
