// Prints the Khronos glTF validator's issue summary of one .glb as JSON.
const fs = require("fs");
const validator = require("gltf-validator");

validator.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])))
  .then((report) => console.log(JSON.stringify(report.issues)))
  .catch((error) => { console.error(String(error)); process.exit(1); });
