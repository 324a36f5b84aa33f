"""The signup rate limit: its part of the signup script, and the web worker's memory of the
clients it refused. (Its settings, ``RATE_LIMIT`` and ``RATE_LIMIT_FAILURE``, and their types
are in :mod:`pipeline.settings`.)

The limit is a GCRA (a token bucket kept as one number): the client's key holds when its next
signup is due, in Redis milliseconds; ``count`` signups may come at once, then one every
``period/count``. It is checked inside the signups' commit script (no extra round trip); each
signup that reaches the script counts, a conflict too.
"""

from __future__ import annotations

import math
import time
from typing import Final

from pipeline.scripts import Signature
from pipeline.settings import RateLimit, RateLimitFailure

#: The rate limit's part of a script's signature: the limit (each signup's client state is a
#: key of the signup's own).
SIGNATURE: Final = Signature(keys=(), args=("rate_count", "rate_period", "rate_failure"))


def script_args(limit: RateLimit | None, failure: RateLimitFailure) -> dict[str, int | str]:
    """The arguments :data:`SCRIPT_PART` reads: count (0: no limit), period in ms, failure."""
    if limit is None:
        return {"rate_count": 0, "rate_period": 0, "rate_failure": failure}
    return {
        "rate_count": limit.count,
        "rate_period": round(limit.period * 1000),
        "rate_failure": failure,
    }


#: The limit's part of a script whose signature includes :data:`SIGNATURE` (a template for
#: :meth:`Signature.source`), for a script that serves many signups in one call: two local
#: functions. ``rate_admit(key)`` counts one signup against the client state at ``key`` and
#: answers nil, or ``'retry <ms>'`` when the client is over its limit (nothing counted), or
#: ``'limiter'`` when the state cannot be read and the limit fails closed. Each client's state
#: is read once per call and its signups counted on in turn, as if each had a call of its
#: own; ``rate_save()``, at the end, writes each state that moved, once.
SCRIPT_PART: Final = """\
local rate_count, rate_period = tonumber($rate_count), tonumber($rate_period)
local rate_due, rate_moved, rate_unreadable = {}, {}, {}
local rate_now
local function rate_admit(key)
  if rate_count <= 0 then return nil end
  local due = rate_due[key]
  if due == nil and not rate_unreadable[key] then
    local stored = redis.pcall('GET', key)
    if type(stored) == 'table' and stored.err then
      rate_unreadable[key] = true
    else
      if rate_now == nil then
        local time = redis.call('TIME')
        rate_now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
      end
      due = math.max(tonumber(stored) or rate_now, rate_now)
      rate_due[key] = due
    end
  end
  if rate_unreadable[key] then
    if $rate_failure ~= 'open' then return 'limiter' end
    return nil
  end
  due = due + rate_period / rate_count
  local over = due - rate_now - rate_period
  if over > 0 then return 'retry ' .. math.ceil(over) end
  rate_due[key] = due
  rate_moved[key] = true
  return nil
end
local function rate_save()
  for key in pairs(rate_moved) do
    local due = rate_due[key]
    redis.call('SET', key, string.format('%.0f', due), 'PX', math.max(1, math.ceil(due - rate_now)))
  end
end
"""


class RefusedClients:
    """The clients this worker has seen refused for their rate limit, and until when: their
    signups are refused at once, before the body is read and without a Redis round trip, so a
    flood from one address costs next to nothing. Redis would refuse them too: a refused
    signup leaves the client's state there as it was, so the client stays over its limit for
    exactly the wait Redis gave. Bounded: past ``max_size`` clients, the expired are dropped,
    then the oldest."""

    def __init__(self, max_size: int = 10_000) -> None:
        self._until: dict[str, float] = {}
        self._max_size = max_size

    def __len__(self) -> int:
        return len(self._until)

    def wait(self, client: str) -> int | None:
        """Whole seconds until ``client`` may sign up again, or None if it may now."""
        until = self._until.get(client)
        if until is None:
            return None
        left = until - time.monotonic()
        if left <= 0:
            del self._until[client]
            return None
        return math.ceil(left)

    def refuse(self, client: str, seconds: float) -> None:
        """Remember that ``client`` is refused for ``seconds``."""
        if len(self._until) >= self._max_size and client not in self._until:
            now = time.monotonic()
            self._until = {c: until for c, until in self._until.items() if until > now}
            while len(self._until) >= self._max_size:
                del self._until[next(iter(self._until))]
        self._until[client] = time.monotonic() + seconds
