"""Client keys, rate limits (RPM/TPM) and concurrency pools in front of the backends.

settings.py     the config models (`auth.keys`, `limits:` blocks, upstream retry/breaker)
keys.py         virtual client keys, stored hashed; authentication
rates.py        the `Limiter` protocol and what it decides (charges, quotas, verdicts)
memory.py       in-process limiter on aiolimiter's leaky bucket
redis.py        the same limits shared by replicas through one atomic Lua script (GCRA)
pool.py         in-flight caps with a bounded, per-key round-robin wait queue
headers.py      OpenAI's x-ratelimit-* headers
tokens.py       TPM estimates before the call, real usage after
clock.py        the injectable time source (aiolimiter-shaped `time()`)
guard.py        the service the proxy calls: authenticate, admit, settle
"""
