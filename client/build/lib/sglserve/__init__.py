"""sglserve's client-side package. The server itself is the `app` package; this distribution
(`sglserve-client`, in the repository's `client/` folder) holds only `sglserve.client`."""
