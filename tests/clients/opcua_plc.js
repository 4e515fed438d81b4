// A PLC's view of the runtime's OPC UA server through node-opcua, a client we did not write.
// Usage: node opcua_plc.js '<json: url, user, password, pki, parts>'; prints one JSON object of what it saw.
"use strict";
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, DataType,
    Variant, ClientSubscription, ClientMonitoredItem, TimestampsToReturn, makeBrowsePath,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const args = JSON.parse(process.argv[2]);
const login = { type: UserTokenType.UserName, userName: args.user, password: args.password };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function client(mode, policy) {
    return OPCUAClient.create({
        applicationName: "node-opcua-plc", applicationUri: "urn:test:node-opcua-plc", securityMode: mode,
        securityPolicy: policy, endpointMustExist: false, connectionStrategy: { maxRetry: 0 },
        clientCertificateManager: new OPCUACertificateManager({ rootFolder: args.pki,
                                                                automaticallyAcceptUnknownCertificate: true }),
    });
}

async function unsecured() {
    // a None channel, the password in clear: what asyncua's server accepted before issue 23
    const plain = client(MessageSecurityMode.None, SecurityPolicy.None);
    try {
        await plain.connect(args.url);
        // node-opcua, like asyncua, will not ask for a session on a channel the server does not list: make it, as a
        // careless or hostile client would, by taking the server's endpoint with its security taken out
        const listed = plain._serverEndpoints[0];
        const none = new listed.constructor({ ...listed, securityMode: MessageSecurityMode.None,
            securityPolicyUri: SecurityPolicy.None, userIdentityTokens: listed.userIdentityTokens.map(
                (token) => new token.constructor({ ...token, securityPolicyUri: SecurityPolicy.None })) });
        plain.findEndpoint = plain.findEndpointForSecurity = () => none;
        const session = await plain.createSession(login);
        const state = await session.read({ nodeId: "ns=0;i=2259", attributeId: AttributeIds.Value });
        await session.close();
        return `connected, read ${state.value.value}`;
    } catch (err) {
        return `refused: ${err.message.split("\n")[0]}`;
    } finally {
        await plain.disconnect();
    }
}

async function secured() {
    const plc = client(MessageSecurityMode.SignAndEncrypt, SecurityPolicy.Basic256Sha256);
    await plc.connect(args.url);
    const seen = { endpoints: (await plc.getEndpoints()).map((e) => e.endpointUrl) };
    const session = await plc.createSession(login);
    try {
        const read = async (nodeId) => session.read({ nodeId, attributeId: AttributeIds.Value });
        const namespaces = (await read("ns=0;i=2255")).value.value;
        const ns = namespaces.indexOf("urn:coft:l1");
        const id = (path) => `ns=${ns};s=l1.${path}`;
        const build = (await read("ns=0;i=2260")).value.value;  // Server_ServerStatus_BuildInfo
        seen.build = { productUri: build.productUri, manufacturer: build.manufacturerName,
                       product: build.productName, version: build.softwareVersion };
        seen.waiting = (await read(id("cam2.Verdict.Score"))).statusCode.name;  // never triggered
        const browsed = await session.translateBrowsePath(
            makeBrowsePath("ObjectsFolder", `/${ns}:l1/${ns}:cam2/${ns}:Threshold`));
        seen.browsed = browsed.targets[0].targetId.toString();
        seen.threshold_id = id("cam2.Threshold");
        const range = (await read(id("cam1.Verdict.LatencyMs.EURange"))).value.value;
        const units = (await read(id("cam1.Verdict.LatencyMs.EngineeringUnits"))).value.value;
        seen.latency = { low: range.low, high: range.high, unitId: units.unitId, units: units.displayName.text,
                         namespaceUri: units.namespaceUri };

        const subscription = ClientSubscription.create(session, {
            requestedPublishingInterval: 20, requestedMaxKeepAliveCount: 20, requestedLifetimeCount: 600,
            maxNotificationsPerPublish: 0, publishingEnabled: true });
        const verdicts = [];
        const item = ClientMonitoredItem.create(subscription, { nodeId: id("cam1.Verdict.Json"),
                                                                attributeId: AttributeIds.Value },
                                                { samplingInterval: 0, discardOldest: false, queueSize: 1000 },
                                                TimestampsToReturn.Both);
        item.on("changed", (value) => { if (value.value.value) verdicts.push(JSON.parse(value.value.value)); });
        await sleep(500);
        for (let i = 0; i < args.parts; i++) {  // a part every 100 ms, its id written to the Trigger node
            await session.write({ nodeId: id("cam1.Trigger"), attributeId: AttributeIds.Value,
                                  value: { value: new Variant({ dataType: DataType.String, value: `node-${i}` }) } });
            await sleep(100);
        }
        const old = (await read(id("cam1.Threshold"))).value.value;
        // one Write, two nodes, one bad: per-node status codes, only the Good one takes effect
        seen.both = (await session.write([
            { nodeId: id("cam1.Threshold"), attributeId: AttributeIds.Value,
              value: { value: new Variant({ dataType: DataType.Double, value: NaN }) } },
            { nodeId: id("cam1.Trigger"), attributeId: AttributeIds.Value,
              value: { value: new Variant({ dataType: DataType.String, value: "node-two-node" }) } },
        ])).map((code) => code.name);
        seen.after_both = (await read(id("cam1.Threshold"))).value.value;
        // an S7 REAL: a Float written to the Double Threshold
        seen.float_write = (await session.write({ nodeId: id("cam2.Threshold"), attributeId: AttributeIds.Value,
            value: { value: new Variant({ dataType: DataType.Float, value: old * 1.25 }) } })).name;
        seen.float_after = (await read(id("cam2.Threshold"))).value.value;
        seen.old = old;
        const deadline = Date.now() + 10000;
        while (!verdicts.some((v) => v.part_id === "node-two-node") && Date.now() < deadline) await sleep(100);
        seen.verdicts = verdicts;
        await subscription.terminate();
    } finally {
        await session.close();
        await plc.disconnect();
    }
    return seen;
}

(async () => {
    const seen = { unsecured: await unsecured(), ...(await secured()) };
    process.stdout.write(JSON.stringify(seen) + "\n");
    process.exit(0);
})().catch((err) => {
    process.stderr.write(`${err.stack}\n`);
    process.exit(1);
});
