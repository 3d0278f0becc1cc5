"""A peer users pick today, for the side-by-side benchmarks: a Python
CoAP-to-MQTT bridge (aiocoap server, paho-mqtt publisher) doing the same job
as m2m-router's uplink for the benchmark's datagrams: a CoAP POST/PUT on
Uri-Path "x" is published to `load/<source port>` on a Mosquitto and
answered 2.04.

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


async def main(bind, coap_port, mqtt_port):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aiocoap-bridge")
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    site = resource.Site()
    site.add_resource(["x"], Publish(client))
    await aiocoap.Context.create_server_context(site, bind=(bind, coap_port))
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
