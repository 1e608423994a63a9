"""Moving one request's KV from the prefill's pool to the decode's, on SGLang's Mooncake PD path.

In request-path order: when a decode registers, and again per request, the two sides check each
other's page format and shared secret (``handshake``, pure functions, called by the manager's
``conn_handshake`` part; the manager SGLang sees is ``mooncake_conn.MemhaKVManager``); during the
prefill forward ``pipeline`` ships each layer as soon as it is written (``layer_signal``: when
that is); after the forward SGLang's transfer worker sends the remaining pages through
``MemhaKVManager.send_kvcache``, converted (``transcode``) or re-paged (``repage``) for a decode
that differs (``conn_bridges``), every byte counted per request (``conn_bytes``); on the decode,
``arrival`` verifies the KV checksum (``integrity``) and applies the on-arrival bridges before the
request is queued for decoding.
"""
