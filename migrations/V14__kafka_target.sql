-- Kafka targets (SPEC "Broker targets"): kafka://[user:pass@]host:port[,host:port…]/{topic}.
-- The constraint keeps its name, url_scheme, as in V12, so the admin API and the CLI keep
-- mapping a refusal onto the `url` field.
--
-- Checked here: one or more comma-separated brokers, each host:port with a port (Kafka has no
-- scheme default everyone agrees on), no empty entry; exactly one topic in Kafka's own
-- alphabet (letters, digits, . _ -, at most 249 characters, not "." or ".."); no query
-- (the relay reads none, so any parameter would be silently ignored) and no fragment.
-- Cheap like V11 and V12: plain classes, one bounded repetition on a short string.

CREATE FUNCTION outbox.is_valid_kafka_target(url text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        -- A host is a name or IPv4 address, or an IPv6 address in brackets.
        SELECT url ~* '^kafka://([^/?#@]*@)?(\[[0-9a-f:.]+\]|[^][/?#@,:]+):[0-9]+(,(\[[0-9a-f:.]+\]|[^][/?#@,:]+):[0-9]+)*/[A-Za-z0-9._-]+$'
           AND length(split_part(url, '/', 4)) <= 249
           AND split_part(url, '/', 4) NOT IN ('.', '..')
    $$;

COMMENT ON FUNCTION outbox.is_valid_kafka_target(text) IS
    'Internal (constraint url_scheme): kafka://[user:pass@]host:port[,host:port...]/topic.';

CREATE OR REPLACE FUNCTION outbox.is_valid_target_url(url text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT length(url) <= 2048 AND url !~ '[[:space:]]' AND CASE lower(split_part(url, '://', 1))
            -- Webhooks: exactly V1's rule, an http(s) URL with a host.
            WHEN 'http' THEN url ~* '^https?://[^/?#]+'
            WHEN 'https' THEN url ~* '^https?://[^/?#]+'
            -- nats://[user:pass@]host[:port]/subject: one subject of dot-separated tokens, no
            -- wildcards (a publish names one subject), no query.
            WHEN 'nats' THEN url ~* '^nats://[^/?#]+/[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$'
            -- redis[s]://[user:pass@]host[:port][/db]?stream=S[&maxlen=N], N a positive
            -- integer of at most 18 digits (it must fit the relay's u64).
            WHEN 'redis' THEN outbox.is_valid_redis_target(url)
            WHEN 'rediss' THEN outbox.is_valid_redis_target(url)
            -- amqp[s]://[user:pass@]host[:port][/vhost][?exchange=E][&routing_key=K]: no
            -- exchange means the default exchange (routing_key then names a queue).
            WHEN 'amqp' THEN outbox.is_valid_amqp_target(url)
            WHEN 'amqps' THEN outbox.is_valid_amqp_target(url)
            -- kafka://[user:pass@]host:port[,host:port...]/topic (V14).
            WHEN 'kafka' THEN outbox.is_valid_kafka_target(url)
            ELSE false
        END
    $$;

COMMENT ON FUNCTION outbox.is_valid_target_url(text) IS
    'Internal (constraint url_scheme): an http(s) webhook URL, or a nats://, redis(s)://, amqp(s):// or kafka:// broker target with its subject, stream, exchange or topic (SPEC "Broker targets").';

-- The constraint calls the function by name: replacing the function is enough for new writes.
-- Rows already stored passed the stricter old rule (kafka:// refused), so none becomes invalid.
