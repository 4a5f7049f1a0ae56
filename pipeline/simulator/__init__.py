"""The built-in exchange simulator: Binance USD-M futures' protocol on local sockets.

    from pipeline.simulator import Simulator, SimConfig
    ws_url, rest_url = await nursery.start(Simulator(SimConfig(rate=0)).run)
"""

from pipeline.simulator.config import SimConfig
from pipeline.simulator.server import Simulator

__all__ = ["SimConfig", "Simulator"]
