"""The traffic memory in Redis, shared by the fleet: one Lua script per ``add`` (one round trip, atomic)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ...redis.client import RedisClient
from ...redis.urls import hash_tag
from .base import RESCALE_AFTER, Clock, Sample, StoredRequest, StoreLimits, _decay, _storable

T = TypeVar("T")

# -- Redis ------------------------------------------------------------------------------------------
#
# Keys, all under ``ns``, the namespace as a hash tag (``{namespace:traffic}``: one Redis Cluster slot holds
# them all, as the scripts touch many at once); a model name is followed by a one-letter part, a request key is hex, so
# no two models' keys can collide:
#   ns:epoch              string   forward-decay epoch (seconds)
#   ns:models             zset     model -> score
#   ns:m:<model>:w        zset     request key -> score (at most ``capacity``)
#   ns:m:<model>:h        hash     request key -> "<last seen>\n<batch>\n<shape>"
#   ns:m:<model>:s        zset     "<batch>\n<shape>" -> score (at most ``capacity``)
#   ns:p:<model>:<key>    string   payload, EXPIRE payload_ttl refreshed on every sighting
#   ns:payloads           zset     "<key>\n<model>" -> score, for the global byte budget
#   ns:sizes              hash     "<key>\n<model>" -> payload size
#   ns:bytes              string   sum of ns:sizes (approximate: payloads expire by themselves)
# The scripts derive key names from ARGV; each is called with ``ns:epoch`` as its one declared key, which
# routes it to the node of that slot on a cluster.

_LUA_COMMON = r"""
local ns = ARGV[1]
local epoch_key, models_key = ns .. ':epoch', ns .. ':models'
local payloads_key, sizes_key, bytes_key = ns .. ':payloads', ns .. ':sizes', ns .. ':bytes'

local function model_key(model, part)
  return ns .. ':m:' .. model .. ':' .. part
end

local function payload_key(model, key)
  return ns .. ':p:' .. model .. ':' .. key
end
"""

_ADD_LUA = _LUA_COMMON + r"""
local now, half_life = tonumber(ARGV[2]), tonumber(ARGV[3])
local capacity, max_total = tonumber(ARGV[4]), tonumber(ARGV[5])
local expire, rescale_after = tonumber(ARGV[6]), tonumber(ARGV[7])
local FIRST, FIELDS = 8, 6

local function num(x)
  return string.format('%.17g', x)
end

local function scale_zset(zkey, factor)
  local items = redis.call('ZRANGE', zkey, 0, -1, 'WITHSCORES')
  for i = 1, #items, 2 do
    redis.call('ZADD', zkey, num(tonumber(items[i + 1]) * factor), items[i])
  end
end

local function rescale(factor)
  for _, model in ipairs(redis.call('ZRANGE', models_key, 0, -1)) do
    scale_zset(model_key(model, 'w'), factor)
    scale_zset(model_key(model, 's'), factor)
  end
  scale_zset(models_key, factor)
  scale_zset(payloads_key, factor)
end

-- The epoch is read and moved inside this atomic script, so every replica scales against the same one.
local function growth()
  local epoch = tonumber(redis.call('GET', epoch_key))
  if epoch == nil or now - epoch > rescale_after * half_life then
    if epoch ~= nil then
      rescale(2 ^ (-(now - epoch) / half_life))
    end
    redis.call('SET', epoch_key, num(now))
    return 1
  end
  return 2 ^ ((now - epoch) / half_life)
end

local function drop_payload(model, key)
  local member = key .. '\n' .. model
  local size = redis.call('HGET', sizes_key, member)
  if size then
    redis.call('DECRBY', bytes_key, size)
    redis.call('HDEL', sizes_key, member)
  end
  redis.call('ZREM', payloads_key, member)
  redis.call('DEL', payload_key(model, key))
end

local function keep_payload(model, key, payload, score)
  local member = key .. '\n' .. model
  local pkey = payload_key(model, key)
  if redis.call('EXPIRE', pkey, expire) == 1 then
    redis.call('ZADD', payloads_key, score, member)
  elseif #payload > 0 then
    redis.call('SET', pkey, payload, 'EX', expire)
    local old = tonumber(redis.call('HGET', sizes_key, member) or 0)
    redis.call('HSET', sizes_key, member, #payload)
    redis.call('INCRBY', bytes_key, #payload - old)
    redis.call('ZADD', payloads_key, score, member)
  else
    drop_payload(model, key) -- expired by itself: release its share of the budget
  end
end

local function trim(model)
  local weights = model_key(model, 'w')
  local extra = redis.call('ZCARD', weights) - capacity
  if extra > 0 then
    local meta = model_key(model, 'h')
    for _, key in ipairs(redis.call('ZRANGE', weights, 0, extra - 1)) do
      redis.call('HDEL', meta, key)
      drop_payload(model, key)
    end
    redis.call('ZREMRANGEBYRANK', weights, 0, extra - 1)
  end
  local shapes = model_key(model, 's')
  extra = redis.call('ZCARD', shapes) - capacity
  if extra > 0 then
    redis.call('ZREMRANGEBYRANK', shapes, 0, extra - 1)
  end
end

local function enforce_budget()
  while tonumber(redis.call('GET', bytes_key) or 0) > max_total do
    local lowest = redis.call('ZRANGE', payloads_key, 0, 0)
    if #lowest == 0 then
      redis.call('SET', bytes_key, 0) -- the counter drifted: nothing is left to account for
      return
    end
    local nl = string.find(lowest[1], '\n', 1, true)
    drop_payload(string.sub(lowest[1], nl + 1), string.sub(lowest[1], 1, nl - 1))
  end
end

local g = growth()
local touched = {}
for i = FIRST, #ARGV, FIELDS do
  local model, key, shape, batch = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local inc = num(tonumber(ARGV[i + 4]) * g)
  redis.call('ZINCRBY', model_key(model, 's'), inc, batch .. '\n' .. shape)
  if key ~= '' then -- a keyless sample is a batch shape only (the batcher's)
    local score = redis.call('ZINCRBY', model_key(model, 'w'), inc, key)
    redis.call('HSET', model_key(model, 'h'), key, num(now) .. '\n' .. batch .. '\n' .. shape)
    redis.call('ZINCRBY', models_key, inc, model)
    keep_payload(model, key, ARGV[i + 5], score)
  end
  touched[model] = true
end
for model in pairs(touched) do
  trim(model)
end
enforce_budget()
return 1
"""

# Returns {epoch, key1, score1, meta1, payload1, ...}: the n heaviest entries with a live payload.
_TOP_LUA = _LUA_COMMON + r"""
local model, n, now, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local weights, meta = model_key(model, 'w'), model_key(model, 'h')
local out = {redis.call('GET', epoch_key) or ''}
local found, start, page_size = 0, 0, math.max(2 * n, 32)
while found < n do
  local page = redis.call('ZREVRANGE', weights, start, start + page_size - 1, 'WITHSCORES')
  for i = 1, #page, 2 do
    local key = page[i]
    local info = redis.call('HGET', meta, key)
    if info and now - tonumber(string.match(info, '^[^\n]*')) <= ttl then
      local payload = redis.call('GET', payload_key(model, key))
      if payload then
        out[#out + 1] = key
        out[#out + 1] = page[i + 1]
        out[#out + 1] = info
        out[#out + 1] = payload
        found = found + 1
        if found == n then
          break
        end
      end
    end
  end
  if #page < 2 * page_size then
    break
  end
  start = start + page_size
end
return out
"""


def _float_or_none(raw: bytes | str | None) -> float | None:
    return float(raw) if raw else None


class RedisStore:
    """Fleet-wide traffic memory in Redis: one Lua script per ``add`` (one round trip, atomic).

    Every call goes through the sidecar's Redis client (``sidecar/redis``): bounded by ``deadline``,
    behind the server's breaker, a failure an empty answer; the scripts are reloaded when a restarted
    Redis has forgotten them.
    """

    kind = "redis"

    def __init__(self, client: RedisClient, limits: StoreLimits, *, clock: Clock, deadline: float = 1.5,
                 owns_client: bool = False) -> None:
        self.limits = limits
        self.dropped = 0
        self._client = client
        self._owns_client = owns_client
        self._clock = clock
        self._closed = False
        self._deadline = deadline
        self._description = f"redis {client.url} namespace={limits.namespace}"
        # Its own hash tag: the forecast's history keeps its keys under ``{namespace}`` (same default namespace).
        self._ns = hash_tag(f"{limits.namespace}:traffic")
        self._route = [f"{self._ns}:epoch"]  # the scripts' declared key: on a cluster, the slot of every key
        self._add_script = client.redis.register_script(_ADD_LUA)
        self._top_script = client.redis.register_script(_TOP_LUA)

    def describe(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"<RedisStore {self._description} breaker={self._client.breaker.state} dropped={self.dropped}>"

    # -- the interface

    async def add(self, samples: Sequence[Sample]) -> None:
        batch = [s for s in samples if s.count > 0]
        if not batch:
            return
        args = self._add_args(batch)
        if self._closed or await self._guard("add", lambda: self._add_script(keys=self._route, args=args)) is None:
            self.dropped += len(batch)

    async def top(self, model: str, n: int) -> list[StoredRequest]:
        if n <= 0:
            return []
        now = self._clock()
        args: list[str | int | float] = [self._ns, model, n, now, self.limits.payload_ttl]
        raw = await self._guard("top", lambda: self._top_script(keys=self._route, args=args))
        return [] if raw is None else self._decode_top(model, raw, now)

    async def shapes(self, model: str) -> list[tuple[str, int, float]]:
        now = self._clock()
        found = await self._guard("shapes", lambda: self._ranked(f"{self._ns}:m:{model}:s"))
        if found is None:
            return []
        decay = _decay(now, found[0], self.limits.half_life)
        shapes = []
        for member, score in found[1]:
            batch, _, shape = member.decode().partition("\n")
            shapes.append((shape, int(batch), score * decay))
        return shapes

    async def models(self) -> list[tuple[str, float]]:
        now = self._clock()
        found = await self._guard("models", lambda: self._ranked(f"{self._ns}:models"))
        if found is None:
            return []
        decay = _decay(now, found[0], self.limits.half_life)
        return [(member.decode(), score * decay) for member, score in found[1]]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.close()

    # -- internals

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """``await call()`` within the deadline; None if Redis fails (the client counts and logs it)."""
        if self._closed:
            return None
        return await self._client.run(f"store_{what}", call, self._deadline)

    def _add_args(self, samples: Sequence[Sample]) -> list[str | int | float | bytes]:
        limits = self.limits
        args: list[str | int | float | bytes] = [
            self._ns,
            self._clock(),
            limits.half_life,
            limits.capacity,
            limits.max_total_bytes,
            max(1, math.ceil(limits.payload_ttl)),  # EXPIRE takes whole seconds
            RESCALE_AFTER,
        ]
        for s in samples:
            args += [s.model, s.key, s.shape, s.batch, s.count, _storable(s.payload, limits)]
        return args

    async def _ranked(self, zset: str) -> tuple[float | None, list[tuple[bytes, float]]]:
        """The epoch and a sorted set, heaviest first, read atomically (MULTI) against rescales."""
        async with self._client.redis.pipeline(transaction=True) as pipe:
            pipe.get(f"{self._ns}:epoch")
            pipe.zrange(zset, 0, -1, desc=True, withscores=True)
            epoch, items = await pipe.execute()
        return _float_or_none(epoch), [(bytes(m), float(s)) for m, s in items]

    def _decode_top(self, model: str, raw: list[Any], now: float) -> list[StoredRequest]:
        decay = _decay(now, _float_or_none(raw[0]), self.limits.half_life)
        found = []
        for i in range(1, len(raw) - 3, 4):
            key, score, info, payload = raw[i : i + 4]
            _, batch, shape = bytes(info).decode().split("\n", 2)
            found.append(StoredRequest(model, key.decode(), float(score) * decay, shape, int(batch), bytes(payload)))
        return found

