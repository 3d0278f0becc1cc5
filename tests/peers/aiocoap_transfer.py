"""One CoAP request with aiocoap, as a stock client would send it.

    aiocoap_transfer.py post URI FILE   POST the file's bytes (aiocoap sends
                                        bodies over 1024 bytes in Block1
                                        blocks); prints the response code
    aiocoap_transfer.py get URI FILE    GET (aiocoap fetches a Block2 answer
                                        whole); writes the payload to FILE
                                        and prints the response code

Exit status 0 when the response is a success (2.xx).
"""

import asyncio
import sys

import aiocoap


async def main(method, uri, path):
    context = await aiocoap.Context.create_client_context()
    try:
        if method == "post":
            with open(path, "rb") as f:
                body = f.read()
            request = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=body)
        else:
            request = aiocoap.Message(code=aiocoap.GET, uri=uri)
        response = await asyncio.wait_for(context.request(request).response, 120)
        if method == "get":
            with open(path, "wb") as f:
                f.write(response.payload)
        print(response.code)
        return 0 if response.code.is_successful() else 1
    finally:
        await context.shutdown()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:4])))
