"""Actor SDK: manage actors from the schedule a dispatch-bridge publishes over MQTT.

A drop-in for `frequenz-dispatch`'s managing API: the same names and shapes, with a
broker URL where that library takes a Dispatch API URL.

```python
from actor_sdk import MergeByType, manage

await manage(broker="mqtt://actor:secret@edge-host:1883", microgrid_id=1,
             dispatch_type="EXAMPLE_TYPE", actor_factory=create_actor,
             merge_strategy=MergeByType(), retry_interval=timedelta(seconds=10))
```
"""

# First: before anything imports frequenz-client-common.
import actor_sdk._upstream_noise  # noqa: F401  # isort: skip
from actor_sdk._actor_api import Actor, ActorFactory, DispatchInfo
from actor_sdk._actor_dispatcher import ActorDispatcher
from actor_sdk._dispatch_model import Dispatch
from actor_sdk._dispatcher import Dispatcher
from actor_sdk._errors import BrokerUrlError, SdkError
from actor_sdk._event import Created, Deleted, DispatchEvent, Updated
from actor_sdk._manage import manage
from actor_sdk._merge_strategies import (
    DispatchActorId,
    MergeByType,
    MergeByTypeTarget,
    MergeStrategy,
)
from actor_sdk._upcoming import UpcomingRun

__all__ = [
    "Actor",
    "ActorDispatcher",
    "ActorFactory",
    "BrokerUrlError",
    "Created",
    "Deleted",
    "Dispatch",
    "DispatchActorId",
    "DispatchEvent",
    "DispatchInfo",
    "Dispatcher",
    "MergeByType",
    "MergeByTypeTarget",
    "MergeStrategy",
    "SdkError",
    "UpcomingRun",
    "Updated",
    "manage",
]
