-- Broker targets (SPEC "Broker targets"): a subscription's url may name a NATS subject, a Redis
-- stream or a RabbitMQ exchange instead of a webhook. The constraint keeps its name,
-- url_scheme, so the admin API and the CLI keep mapping a refusal onto the `url` field.
--
-- What is checked here is the shape the relay needs to publish at all: a known scheme, a host,
-- the subject / stream, and only query parameters the relay reads (a misspelt `maxlen` must
-- not silently mean "no trimming"). Whether the broker answers is found out when publishing,
-- as a failed attempt.
--
-- Cheap like V11: plain `+` classes and string functions, no bounded repetition, so the check
-- costs about what the old regex did. It runs on subscription writes only, which are rare.

CREATE FUNCTION outbox.target_url_query_ok(url text, allowed text[], required text)
    RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        -- Every `key=value` pair names an allowed key, at most once each, with a non-empty
        -- value; `required` (when not null) is among them.
        WITH pairs AS (
            SELECT split_part(p, '=', 1) AS key, substr(p, length(split_part(p, '=', 1)) + 2) AS value,
                   strpos(p, '=') > 0 AS has_value
              FROM unnest(string_to_array(substr(url, strpos(url, '?') + 1), '&')) AS p
             WHERE strpos(url, '?') > 0
        )
        SELECT coalesce(bool_and(key = ANY (allowed) AND has_value AND value <> ''), true)
           AND count(*) = count(DISTINCT key)
           AND (required IS NULL OR bool_or(key = required) IS TRUE)
          FROM pairs
    $$;

COMMENT ON FUNCTION outbox.target_url_query_ok(text, text[], text) IS
    'Internal (constraint url_scheme): the URL''s query holds only the allowed keys, each once with a value, and the required one.';

CREATE FUNCTION outbox.is_valid_redis_target(url text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT url ~* '^rediss?://[^/?#]+(/[0-9]{0,5})?\?[^?#]+$'
           AND url !~* '[?&]maxlen=([^&]*[^0-9&]|0+(&|$)|[0-9]{19})'
           AND outbox.target_url_query_ok(url, '{stream,maxlen}', 'stream')
    $$;

COMMENT ON FUNCTION outbox.is_valid_redis_target(text) IS
    'Internal (constraint url_scheme): redis[s]://[user:pass@]host[:port][/db]?stream=S[&maxlen=N].';

CREATE FUNCTION outbox.is_valid_amqp_target(url text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT url ~* '^amqps?://[^/?#]+(/[^/?#]*)?(\?[^?#]*)?$'
           AND outbox.target_url_query_ok(url, '{exchange,routing_key}', NULL)
    $$;

COMMENT ON FUNCTION outbox.is_valid_amqp_target(text) IS
    'Internal (constraint url_scheme): amqp[s]://[user:pass@]host[:port][/vhost][?exchange=E][&routing_key=K].';

CREATE FUNCTION outbox.is_valid_target_url(url text) RETURNS boolean
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
            ELSE false
        END
    $$;

COMMENT ON FUNCTION outbox.is_valid_target_url(text) IS
    'Internal (constraint url_scheme): an http(s) webhook URL, or a nats://, redis(s):// or amqp(s):// broker target with its subject, stream or exchange parameters (SPEC "Broker targets").';

ALTER TABLE outbox.subscriptions DROP CONSTRAINT url_scheme;
ALTER TABLE outbox.subscriptions
    ADD CONSTRAINT url_scheme CHECK (outbox.is_valid_target_url(url));
