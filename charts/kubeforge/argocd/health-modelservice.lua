-- Argo CD health check for kubeforge.io/ModelService: the value of
-- resource.customizations.health.kubeforge.io_ModelService in argocd-cm (see ../README.md).
--
-- It reads what the kubeforge operator writes (kstatus semantics): status.observedGeneration
-- and the Stalled, Reconciling and Ready conditions, derived from the phase in one place
-- (operator/kubeforge/controller/readiness.py). Healthy means replicas serve the artifact.
-- Only Argo CD's default Lua libraries are used (base and table; no string library).
local hs = {}

local function health(status, condition)
  hs.status = status
  hs.message = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    hs.message = hs.message .. ": " .. condition.message
  end
  return hs
end

if obj.status == nil then
  return health("Progressing", {reason = "NoStatus", message = "waiting for the kubeforge operator"})
end
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
if generation ~= nil and obj.status.observedGeneration ~= generation then
  return health("Progressing", {reason = "LatestGenerationNotObserved",
                                message = "the operator has not acted on the latest spec yet"})
end

local conditions = {}
for _, condition in ipairs(obj.status.conditions or {}) do
  if condition.type ~= nil then
    conditions[condition.type] = condition
  end
end
local stalled, reconciling, ready = conditions["Stalled"], conditions["Reconciling"], conditions["Ready"]
if stalled ~= nil and stalled.status == "True" then
  return health("Degraded", stalled)
end
if reconciling ~= nil and reconciling.status == "True" then
  return health("Progressing", reconciling)
end
if ready ~= nil then
  if ready.status == "True" then
    return health("Healthy", ready)
  end
  return health("Progressing", ready)
end

-- A status written before the Ready condition existed: the phase.
local phase = obj.status.phase or "Pending"
if phase == "Ready" then
  return health("Healthy", {reason = phase})
end
if phase == "Failed" then
  return health("Degraded", {reason = phase})
end
return health("Progressing", {reason = phase})
