"""A peer users pick today, for the side-by-side benchmarks: a Python
CoAP-to-MQTT bridge (aiocoap server, paho-mqtt publisher) doing the same job
as m2m-router's uplink for the benchmark's datagrams: a CoAP POST/PUT on
Uri-Path "x" is published to `load/<source port>` on a Mosquitto and
answered 2.04 (a body sent in Block1 blocks is reassembled by aiocoap and
published whole). For the Observe fan-out, Uri-Path "obs" is an observable
resource whose state is each message published on the MQTT topic
`fanout`: every observer gets it as a notification (RFC 7641).

    python aiocoap_bridge.py BIND_ADDR COAP_PORT MQTT_PORT
"""

import asyncio
import sys

import aiocoap
import aiocoap.resource as resource
import paho.mqtt.client as mqtt


class Publish(resource.Resource):
    def __init__(self, client):
        super().__init__()
        self.client = client

    async def render_post(self, request):
        port = request.remote.hostinfo.rsplit(":", 1)[-1]
        self.client.publish(f"load/{port}", request.payload, qos=0)
        return aiocoap.Message(code=aiocoap.CHANGED)

    render_put = render_post


class Observed(resource.ObservableResource):
    """The latest message on MQTT topic `fanout`, observable."""

    def __init__(self):
        super().__init__()
        self.state = b""

    def update(self, payload):
        self.state = payload
        self.updated_state()

    async def render_get(self, request):
        return aiocoap.Message(payload=self.state)


async def main(bind, coap_port, mqtt_port):
    loop = asyncio.get_running_loop()
    observed = Observed()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aiocoap-bridge")
    # paho's network thread hands each state to the event loop.
    client.on_message = lambda _c, _u, m: loop.call_soon_threadsafe(observed.update, m.payload)
    client.on_connect = lambda c, _u, _f, _r, _p: c.subscribe("fanout", qos=0)
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    site = resource.Site()
    site.add_resource(["x"], Publish(client))
    site.add_resource(["obs"], observed)
    await aiocoap.Context.create_server_context(site, bind=(bind, coap_port))
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
